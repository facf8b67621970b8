"""Scoring a model on a split, with the real audio cue and with it replaced (the probes).

Predictions are the Mask2Former semantic inference (``class_scores``) at the dataset's mask
size; binary tasks give the foreground logit log(s_sounding) − log(s_background) (two-channel
protocols get both log-scores), semantic tasks per-class log-scores. Scores come from the
named protocols of ``soundstage.metrics`` (Accumulator, per batch), with the frames of a clip
marked as one video.
"""

from __future__ import annotations

import numpy as np
import torch

from soundstage.metrics import PROTOCOLS, Accumulator
from soundstage.models.avs_mask2former import class_scores
from soundstage.train.data import collate_frames, frame_clip_ids
from soundstage.train.distributed import Distributed, rank_indices, reduce_accumulator

EPS = 1e-6
DEFAULT_PROTOCOL = {"binary": "avsbench-binary", "semantic": "avsbench-semantic"}


def model_inputs(batch: dict, device) -> dict:
    """The model's keyword arguments from a collated batch."""
    names = {
        "pixel_values": "pixel_values",
        "audio": "audio",
        "active": "active",
        "text": "text",
        "text_mask": "text_mask",
        "prior": "prior",
    }
    return {arg: batch[key].to(device, non_blocking=True) for key, arg in names.items() if key in batch}


def predictions(outputs, size, task: str, two_channel: bool) -> torch.Tensor:
    """Binary: the foreground logit log(s_sounding) − log(s_background) (two-channel protocols
    get both log-scores); semantic: per-class log-scores."""
    scores = class_scores(outputs, size).clamp_min(EPS).log()
    if task == "semantic" or two_channel:
        return scores
    return scores[:, 1] - scores[:, 0]


def predict(model, batch: dict, device, size, task: str, two_channel: bool) -> torch.Tensor:
    """The generic recipe's evaluation predictions for a collated batch."""
    return predictions(model(**model_inputs(batch, device)), size, task, two_channel)


def two_channel_logits(logits: torch.Tensor) -> torch.Tensor:
    """A foreground logit l ``[N, H, W]`` as the two-channel logits ``[N, 2, H, W]`` = (−l, 0):
    their argmax is l > 0 and Stepping Stones' F input sigmoid(2·l1 − l0) is sigmoid(l)."""
    return torch.stack([-logits, torch.zeros_like(logits)], dim=1)


@torch.no_grad()
def evaluate(
    model,
    dataset,
    task: str,
    protocol: str | None = None,
    device="cpu",
    autocast=None,
    batch_size: int = 4,
    workers: int = 0,
    dist: Distributed | None = None,
    predict=predict,
) -> dict:
    """The protocol's result dict (``miou``, ``fscore``, ...) plus ``clips`` and ``frames``.

    ``dist``: with several ranks each scores whole protocol batches of clips (group ``g`` on
    rank ``g mod W``) and the Accumulator totals are summed over ranks, so every rank returns
    what one process scoring the whole split returns. ``predict``: the recipe's
    (``soundstage.train.recipes``), ``(model, batch, device, size, task, two_channel) -> logits``."""
    dist = dist or Distributed()
    protocol = protocol or DEFAULT_PROTOCOL[task]
    proto = PROTOCOLS[protocol]
    two_channel = bool(proto.defaults.get("two_channel"))
    if proto.kind == "semantic" and task != "semantic":
        raise ValueError(f"protocol {protocol} scores class predictions; this model is binary")
    options = {"pred_kind": "logits"}
    if proto.kind == "semantic":
        options["num_classes"] = getattr(model, "num_classes", None) or model.config.num_labels
    accumulator = Accumulator(protocol, **options)
    share = dataset
    if dist.active:
        share = torch.utils.data.Subset(dataset, rank_indices(len(dataset), accumulator.options.get("batch_size") or 1, dist))
    loader = torch.utils.data.DataLoader(
        share,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_frames,
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()
    frames = 0
    try:
        for batch in loader:
            labels = batch["labels"]
            with autocast() if autocast else _null():
                pred = predict(model, batch, device, tuple(labels.shape[-2:]), task, two_channel)
            pred = pred.float().cpu()
            videos = frame_clip_ids(batch)
            accumulator.update(pred, labels, videos=videos)
            frames += len(labels)
    finally:
        model.train(was_training)
    if dist.active:
        reduce_accumulator(accumulator, dist, str(device))
        frames = int(dist.sum(frames, str(device)))
    result = accumulator.compute()
    result.update(clips=len(dataset), frames=frames)
    return _plain(result)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plain(value):
    """Numbers and lists JSON can hold (numpy scalars and arrays converted)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
