"""Scoring a model on a split, with the real audio cue and with it replaced (the probes).

Predictions are the Mask2Former semantic inference (``class_scores``) at the dataset's mask
size; binary tasks give the foreground logit log(s_sounding) − log(s_background) (two-channel
protocols get both log-scores), semantic tasks per-class log-scores. Scores come from the
named protocols of ``soundstage.metrics`` (Accumulator, per batch), with the frames of a clip
marked as one video.

A training run's evaluations score its headline protocol and, beside it, every other protocol of
its task (``run_protocols``) in one pass; their numbers have names (``metric_names``,
``soundstage.train.metric_names``) that ``--select`` and the trackers use.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from soundstage.metrics import PROTOCOLS, Accumulator
from soundstage.models.avs_mask2former import class_scores
from soundstage.pipeline.lifeline import leave_stops_to_the_parent
from soundstage.train.data import collate_frames, frame_clip_ids
from soundstage.train.distributed import Distributed, rank_indices, reduce_accumulator
from soundstage.train.metric_names import metric_name

EPS = 1e-6
DEFAULT_PROTOCOL = {"binary": "avsbench-binary", "semantic": "avsbench-semantic"}


def model_inputs(batch: dict, device) -> dict:
    """The model's keyword arguments from a collated batch; floating inputs in the default dtype
    (float64 in an ``fp64`` run)."""
    names = {
        "pixel_values": "pixel_values",
        "audio": "audio",
        "active": "active",
        "text": "text",
        "text_mask": "text_mask",
        "prior": "prior",
    }
    dtype = torch.get_default_dtype()
    return {
        arg: batch[key].to(device, dtype=dtype if batch[key].is_floating_point() else None, non_blocking=True)
        for key, arg in names.items()
        if key in batch
    }


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


def protocols_for(task: str) -> list[str]:
    """Every named protocol that scores a model of ``task`` (binary: the binary ones)."""
    kind = "semantic" if task == "semantic" else "binary"
    return [name for name, proto in PROTOCOLS.items() if proto.kind == kind]


def run_protocols(cfg) -> tuple[str, tuple[str, ...]]:
    """(the headline protocol, the others scored beside it) of a run's evaluations."""
    headline = cfg.protocol or DEFAULT_PROTOCOL[cfg.task]
    return headline, tuple(p for p in protocols_for(cfg.task) if p != headline)


def selected_metric(cfg) -> str:
    """What ``model/best`` is chosen by: ``--select``, default the headline protocol's mIoU on
    the evaluation split with the real audio (higher is better, as for every metric offered)."""
    return cfg.select or metric_name(cfg.eval_split, run_protocols(cfg)[0], "real", "miou")


def metric_names(cfg) -> list[str]:
    """Every name the run's evaluations give (``soundstage.train.metric_names``)."""
    names = []
    headline, others = run_protocols(cfg)
    for protocol in (headline, *others):
        for metric in ("miou", "fscore"):
            names.append(metric_name(cfg.eval_split, protocol, "real", metric))
            for variant in cfg.probes:
                names.append(metric_name(cfg.eval_split, protocol, variant, metric))
                names.append(metric_name(cfg.eval_split, protocol, f"real-{variant}", metric))
    return names


def with_protocols(results: dict, headline: str) -> dict:
    """``{protocol: result}`` as one record: the headline's result with ``protocols``, each
    protocol's miou, fscore and aggregation (a line of ``epochs.jsonl``)."""
    keep = ("miou", "fscore", "aggregation")
    return {**results[headline], "protocols": {name: {k: r.get(k) for k in keep} for name, r in results.items()}}


@torch.no_grad()
def evaluate(
    model,
    dataset,
    task: str,
    protocol: str | list | None = None,
    device="cpu",
    autocast=None,
    batch_size: int = 4,
    workers: int = 0,
    dist: Distributed | None = None,
    predict=predict,
    options: dict | None = None,
) -> dict:
    """The protocol's result dict (``miou``, ``fscore``, ...) plus ``clips`` and ``frames``; with a
    list of protocols, ``{protocol: result}`` from one pass over the data.

    ``dist``: with several ranks each scores whole protocol batches of clips (group ``g`` on
    rank ``g mod W``) and the Accumulator totals are summed over ranks, so every rank returns
    what one process scoring the whole split returns (one protocol at a time). ``predict``: the
    recipe's (``soundstage.train.recipes``), ``(model, batch, device, size, task, two_channel) -> logits``;
    a binary model's two-channel logits give the other protocols their foreground logit (channel 1
    minus channel 0). ``options``: protocol -> its options (batch_size, frames_per_video,
    threshold, aggregation, ...)."""
    dist = dist or Distributed()
    names = [protocol or DEFAULT_PROTOCOL[task]] if not isinstance(protocol, list) else protocol
    accumulators = {name: _accumulator(name, task, model, (options or {}).get(name)) for name in names}
    two_channel = {name: bool(PROTOCOLS[name].defaults.get("two_channel")) for name in names}
    share = dataset
    if dist.active:  # whole batches of every protocol on each rank
        groups = math.lcm(*(acc.options.get("batch_size") or 1 for acc in accumulators.values()))
        share = torch.utils.data.Subset(dataset, rank_indices(len(dataset), groups, dist))
    loader = torch.utils.data.DataLoader(
        share,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_frames,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=leave_stops_to_the_parent,
    )
    was_training = model.training
    model.eval()
    frames = 0
    try:
        for batch in loader:
            labels = batch["labels"]
            with autocast() if autocast else _null():
                pred = predict(model, batch, device, tuple(labels.shape[-2:]), task, any(two_channel.values()))
            pred = pred.float().cpu()
            videos = frame_clip_ids(batch)
            for name, accumulator in accumulators.items():
                mine = pred[:, 1] - pred[:, 0] if any(two_channel.values()) and not two_channel[name] else pred
                accumulator.update(mine, labels, videos=videos)
            frames += len(labels)
    finally:
        model.train(was_training)
    results = {}
    for name, accumulator in accumulators.items():
        if dist.active:
            reduce_accumulator(accumulator, dist, str(device))
        result = accumulator.compute()
        result.update(clips=len(dataset), frames=int(dist.sum(frames, str(device))) if dist.active else frames)
        results[name] = _plain(result)
    return results if isinstance(protocol, list) else results[names[0]]


def _accumulator(protocol: str, task: str, model, given: dict | None = None) -> Accumulator:
    proto = PROTOCOLS[protocol]
    if proto.kind == "semantic" and task != "semantic":
        raise ValueError(f"protocol {protocol} scores class predictions; this model is binary")
    options = {"pred_kind": "logits", **(given or {})}
    if proto.kind == "semantic":
        options["num_classes"] = getattr(model, "num_classes", None) or model.config.num_labels
    return Accumulator(protocol, **options)


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
