"""Exact resume: checkpoints written atomically, holding everything the next step depends on.

A checkpoint is one ``torch.save`` file of plain containers and tensors — loadable with
``torch.load(weights_only=True)`` — holding the model, optimizer, scheduler and AMP scaler
states, the step, the epoch, the sampler's position in the epoch and every random state
(Python, NumPy, torch CPU, each CUDA device). DataLoader workers take their seeds from the
loader's own generator, seeded with the run's seed when the loader is made (again on resume), so
they do not depend on where the run stopped; the data pipeline draws no random numbers anyway.

Writing: to a temporary file in the same folder, flushed, fsynced, renamed over the target and
the folder fsynced, so ``kill -9`` at any moment leaves the previous checkpoint or the new one,
never half of one.

``EpochSampler`` visits the dataset in a permutation drawn from (seed, epoch) alone and can
start part-way into it, so a resumed epoch continues with exactly the items an uninterrupted
run would have seen next. For DDP it takes ``rank``/``world_size`` and strides the permutation.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

LATEST = "latest.pt"


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
    """``position``: items of ``epoch`` already consumed (the sampler resumes after them)."""
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "epoch": epoch,
            "position": position,
            "rng": rng_state(),
            "extra": extra or {},
        },
        path,
    )


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler) -> dict:
    """Restore the states in place (random states too); returns step, epoch, position, extra."""
    state = torch.load(path, map_location="cpu", weights_only=True)
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
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        import signal

        self.received = signal.Signals(number).name

    def __exit__(self, *exc):
        import signal

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
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict (name -> tensor)")
    return recipe.key_map(state) if recipe.key_map else state
