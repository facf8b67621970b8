"""Exact resume: checkpoints written atomically, holding everything the next step depends on.

A checkpoint is one ``torch.save`` file of plain containers and tensors — loadable with
``torch.load(weights_only=True)`` — holding the model, optimizer, scheduler and AMP scaler
states, the step, the epoch, the sampler's position in the epoch and every random state
(Python, NumPy, torch CPU, each CUDA device). DataLoader workers take their seeds from the
loader's own generator, seeded with the run's seed when the loader is made (again on resume), so
they do not depend on where the run stopped; the data pipeline draws no random numbers anyway.

Writing: to a temporary file in the same folder, flushed, fsynced, renamed over the target and
the folder fsynced, so ``kill -9`` at any moment leaves the previous checkpoint or the new one,
never half of one. The one it replaces is kept as ``previous.pt``: the last two are on disk.

Checking: each checkpoint holds the sha256 of its own content (every tensor's bytes, every
value), verified when it is loaded — torch reads a zip without checking it, so bytes damaged on
disk would otherwise be resumed from silently. A damaged latest checkpoint is set aside
(``latest.pt.damaged``) with one line and the run resumes from ``previous.pt``, replaying the
steps since, which ends exactly as an uninterrupted run would; with no good checkpoint left the
run stops with ``CheckpointError`` rather than start over.

``EpochSampler`` visits the dataset in a permutation drawn from (seed, epoch) alone and can
start part-way into it, so a resumed epoch continues with exactly the items an uninterrupted
run would have seen next. For DDP it takes ``rank``/``world_size`` and strides the permutation.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading

import numpy as np
import torch

LATEST = "latest.pt"
PREVIOUS = "previous.pt"
DAMAGED = ".damaged"  # suffix of a checkpoint set aside


class CheckpointError(ValueError):
    """The run has checkpoints but none of them is good: it cannot resume, and must not restart."""


def content_digest(state) -> str:
    """sha256 over a checkpoint's content: nested dicts (in key order), lists and tuples, tensors
    (dtype, shape and bytes) and plain values."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, dict):
            digest.update(b"{%d" % len(value))
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[%d" % len(value))
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{data.dtype}{tuple(value.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{type(value).__name__}:{value!r}".encode())

    visit(state)
    return digest.hexdigest()


def previous_of(path: str) -> str:
    return os.path.join(os.path.dirname(path), PREVIOUS)


def candidates(path: str) -> list[str]:
    """The checkpoints of a run whose latest is ``path``, newest first: ``latest.pt.next`` (only
    there when a kill came between writing it and renaming it ``latest.pt``), ``latest.pt``,
    ``previous.pt``."""
    return [f"{path}.next", path, previous_of(path)]


def has_checkpoint(path: str) -> bool:
    """Whether the run of checkpoint ``path`` (``.../latest.pt``) has one to resume from."""
    return any(os.path.exists(p) for p in candidates(path))


def atomic_torch_save(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every global random state, as tensors and plain lists (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str, *, model, optimizer, scheduler, scaler, step: int, epoch: int, position: int, extra: dict | None = None
) -> None:
    """``position``: items of ``epoch`` already consumed (the sampler resumes after them). The
    checkpoint ``path`` held until now becomes ``previous.pt``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "epoch": epoch,
        "position": position,
        "rng": rng_state(),
        "extra": extra or {},
    }
    state["sha256"] = content_digest(state)
    tmp = f"{path}.next"
    atomic_torch_save(state, tmp)
    if os.path.exists(path):
        os.replace(path, previous_of(path))  # killed right here: previous.pt and latest.pt.next are both whole
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    """The states in checkpoint ``path``, checked against the digest it holds (one without a digest,
    written before checkpoints had one, is taken as it is); ``CheckpointError`` saying why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 — whatever torch makes of damaged bytes
        raise CheckpointError(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not {"model", "step", "rng"} <= set(state):
        raise CheckpointError("not a training checkpoint of soundstage")
    stored = state.pop("sha256", None)
    if stored is not None and stored != content_digest(state):
        raise CheckpointError("its content does not match the checksum it holds (damaged on disk)")
    return state


def resume_checkpoint(path: str, *, model, optimizer, scheduler, scaler, log=print, set_aside: bool = True) -> dict:
    """Restore the newest good checkpoint of ``path`` (``candidates``); a damaged newer one is
    renamed ``*.damaged`` (when ``set_aside``: one rank does it) with one line. No good one:
    ``CheckpointError``, nothing renamed, so a rerun says the same."""
    damaged = []
    for candidate in candidates(path):
        try:
            state = read_checkpoint(candidate)
        except FileNotFoundError:
            continue
        except CheckpointError as e:
            damaged.append((candidate, str(e)))
            continue
        for bad, why in damaged:
            if set_aside and os.path.exists(bad):
                os.replace(bad, bad + DAMAGED)
            log(f"{bad}: {why}; set aside as {os.path.basename(bad)}{DAMAGED}, resuming from {os.path.basename(candidate)}")
        return restore(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    shown = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
    raise CheckpointError(
        f"{os.path.dirname(path)}: no good checkpoint to resume from ({shown}); the run cannot go on from where it was: "
        "train into another --out (or remove this run folder to start it over)"
    )


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler) -> dict:
    """Restore the states of checkpoint ``path`` in place (random states too), after checking its
    checksum; returns step, epoch, position, extra."""
    return restore(read_checkpoint(path), model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def restore(state: dict, *, model, optimizer, scheduler, scaler) -> dict:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return {k: state[k] for k in ("step", "epoch", "position", "extra")}


class EpochSampler(torch.utils.data.Sampler):
    """The items of one epoch in a permutation fixed by (seed, epoch), from ``start`` on."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order()[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return max(0, len(self.order()[self.rank :: self.world_size]) - self.start)


class StopSignals:
    """SIGTERM / SIGUSR1 (a scheduler's time limit or preemption) ask the loop to checkpoint and
    exit after the current step; the previous handlers come back on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        self.received = signal.Signals(number).name

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


class WeightsError(ValueError):
    pass


def read_state_dict(path: str, recipe) -> dict:
    """Model weights in our key layout from ``path``: a saved model folder (``recipe.load``), a
    checkpoint of ours (``{"model": ...}``), or a plain state dict — ours, or the seed code's
    ``torch.save(model.state_dict())`` mapped by ``recipe.key_map``. Loaded with
    ``weights_only=True`` (no pickled code runs)."""
    if os.path.isdir(path):
        return recipe.load(path).state_dict()
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the same user error
        raise WeightsError(f"{path}: not a torch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and {"model", "step", "rng"} <= set(state):  # a training checkpoint: checked
        try:
            state = read_checkpoint(path)["model"]
        except CheckpointError as e:
            raise WeightsError(f"{path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict (name -> tensor)")
    return recipe.key_map(state) if recipe.key_map else state
