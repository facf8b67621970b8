"""A trained run as a predictor: every frame of a clip in, foreground probabilities out.

``open_trained(run)`` reopens a training run as ``soundstage evaluate --run`` does — its
``model/best`` or ``model/last`` (or the weights of its last checkpoint), the cache outputs recorded in
``provenance.json`` — and ``foreground(trained, clips, size)`` runs it on whole clips (every
frame, annotated or not) in one batch of frames. The foreground probability of a pixel is the
sigmoid of the logit the evaluation scores (the run's recipe's predictions): for the generic
recipe ``s1 / (s0 + s1)`` of Mask2Former's semantic scores (background s0, sounding s1), so
``p > 0.5`` is Stepping Stones' "p(sounding) > p(background)".

``run_identity(run)`` is what identifies a run's predictions in a cache key: the content hash
of every weights the run holds (best and last: the ``weights`` choice is a parameter of its
own), the fingerprints of the cue outputs it reads and the input
size — never its path.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

import soundstage.train.assemble as assemble
from soundstage.device import resolve_device, torch_dtype
from soundstage.pipeline.identity import model_identity
from soundstage.train.config import ConfigError, TrainConfig
from soundstage.train.cues import CueError
from soundstage.train.data import AVSClips, active_weights, load_image
from soundstage.train.recipes import get_recipe
from soundstage.train.run_dir import WEIGHTS, MissingWeights, RunDir
from soundstage.train.run_eval import load_run, run_model


@dataclass
class Trained:
    run: RunDir
    cfg: TrainConfig
    model: torch.nn.Module
    cues: dict  # role -> (CueSpec, StageReader)
    device: str
    dtype: torch.dtype
    weights: str  # where the weights came from

    @property
    def image_size(self) -> int:
        return assemble.image_size(self.cfg)

    @property
    def num_queries(self) -> int:
        return self.model.config.num_queries


def run_identity(path: str | None) -> dict | None:
    """The fingerprint entry of a run (see the module docstring)."""
    if not path:
        return None
    run, cfg, recorded = load_run(path)
    held = {}
    for which in WEIGHTS:
        with contextlib.suppress(MissingWeights):
            where, what = run.weights(which)
            held[what] = model_identity(where)
    if not held:
        run.weights()  # raises: neither a model nor a checkpoint
    return {
        "weights": held,
        "task": cfg.task,
        "image_size": assemble.image_size(cfg),
        "cues": {role: entry["fingerprint"] for role, entry in sorted(recorded.items())},
    }


@functools.lru_cache(maxsize=8)
def run_image_size(path: str) -> int:
    """The input size the run's model was trained at (read once per process)."""
    return assemble.image_size(load_run(path)[1])


def open_trained(
    path: str, device: str = "auto", dtype: str = "fp32", binary: bool = True, log=print, weights: str | None = None
) -> Trained:
    """The run at ``path`` ready for inference; ``binary``: refuse a semantic (71-class) run;
    ``weights``: best | last (None: best when the run has one)."""
    run, cfg, recorded = load_run(path)
    if binary and cfg.task != "binary":
        raise ConfigError(f"{path} was trained with task {cfg.task!r}; foreground masks need a binary (class-agnostic) run")
    if cfg.prior:
        raise ConfigError(
            f"{path} was trained with a mask prior (a stage-2 run); foreground masks come from a run "
            "without one, whose frames need nothing but their cues"
        )
    device = resolve_device(device)
    torch_type = torch_dtype(dtype)
    if torch_type != torch.float32 and not device.startswith("cuda"):
        raise ConfigError(f"dtype {dtype} is meant for GPUs; use fp32 on {device}")
    cues = assemble.open_cues(cfg, recorded=recorded, log=log)
    model, source = run_model(run, cfg, cues, weights)
    return Trained(run, cfg, model.to(device).eval(), cues, device, torch_type, source)


def clip_cues(trained: Trained, clip_id: str, seconds: int) -> dict[str, np.ndarray]:
    """role -> the real cue of each of the clip's ``seconds`` frames, as the training data gives it."""
    out = {}
    for role, (spec, reader) in trained.cues.items():
        if clip_id not in reader:
            raise CueError(
                f"clip {clip_id} is not in the {role} cue {spec.stage} {reader.meta['fingerprint']} the run was trained on"
            )
        values = reader[clip_id]
        rows = AVSClips._rows(values[spec.field], seconds, clip_id, spec)
        if role == "active":
            rows = active_weights(rows, clip_id, trained.num_queries, get_recipe(trained.cfg.recipe).active_encoding)
        out[role] = np.asarray(rows, dtype=np.float32)
        if spec.mask_field:
            out[f"{role}_mask"] = AVSClips._rows(values[spec.mask_field], seconds, clip_id, spec).astype(bool)
    return out


def read_frames(paths: list[str], image_size: int) -> np.ndarray:
    """``[T, 3, S, S]`` float32, the training data's image processing."""
    return np.stack([load_image(p, image_size) for p in paths])


@torch.inference_mode()
def foreground(trained: Trained, clips: list[dict], size: int) -> list[np.ndarray]:
    """Foreground probability ``[T, size, size]`` float32 per clip. Each clip: ``pixel_values
    [T, 3, S, S]``, its cues (``clip_cues``) and optionally ``clip_id``; all frames of all clips go
    through the model as one batch (under autocast in ``trained.dtype`` when that is not fp32)."""
    batch = {"pixel_values": np.concatenate([c["pixel_values"] for c in clips])}
    for key in clips[0]:
        if key not in ("pixel_values", "clip_id"):
            batch[key] = np.concatenate([c[key] for c in clips])
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    lengths = [len(c["pixel_values"]) for c in clips]
    batch["clip_ids"] = [c.get("clip_id", str(i)) for i, c in enumerate(clips)]
    batch["clip_index"] = torch.repeat_interleave(torch.arange(len(clips)), torch.tensor(lengths))
    batch["frames"] = torch.cat([torch.arange(n) for n in lengths])
    autocast = (
        torch.autocast(device_type=torch.device(trained.device).type, dtype=trained.dtype)
        if trained.dtype != torch.float32
        else contextlib.nullcontext()
    )
    with autocast:
        logits = get_recipe(trained.cfg.recipe).predict(trained.model, batch, trained.device, (size, size), "binary", False)
    probs = torch.sigmoid(logits.float()).cpu().numpy()
    ends = np.cumsum(lengths)[:-1]
    return np.split(probs, ends)


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] stored as round(255 p) (error at most 1/510)."""
    return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
