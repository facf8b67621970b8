"""Per-frame quantities of the binary (foreground / background) protocols and their batching.

The per-frame rules follow AVSBench ``avs_scripts/avs_s4/utils/utility.py`` (``mask_iou``,
``_eval_pr``, ``Eval_Fmeasure``), computed in float32 like the original:

- IoU: inter = Σ pred·gt, union = Σ max(pred, gt); a frame whose ground truth is empty scores its
  true negatives instead, Σ (1−pred)(1−gt) / (H·W); iou = inter / (union + 1e−7).
- F curve: 255 thresholds ``torch.linspace(0, 1 − 1e−10, 255)`` in float32 (so the last one is
  exactly 1.0); per threshold precision = tp / (Σ[p ≥ t] + 1e−20), recall = tp / (Σ gt + 1e−20),
  F = (1 + β²)·P·R / (β²·P + R), NaN → 0. Frames with empty ground truth have no curve.
- A batch's F is the max over thresholds of its frames' mean curve, 0 when every frame of the
  batch has empty ground truth; its mIoU is the mean of its frames' IoU. The reported number is
  the mean over batches (``AverageMeter`` in the reference ``test.py``), the last partial batch
  included. ``batch_size=None`` makes the whole set one batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PR_STEPS = 255
IOU_EPS = 1e-7
PR_EPS = 1e-20


def thresholds() -> torch.Tensor:
    return torch.linspace(0, 1 - 1e-10, PR_STEPS, dtype=torch.float32)


def frame_iou(mask: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 IoU of int 0/1 masks against float ground truth, both ``[N, H, W]``."""
    empty = gt.sum(2).sum(1) == 0
    inter = (mask * gt).sum(2).sum(1)
    union = torch.max(mask, gt).sum(2).sum(1)
    inter[empty] = ((1 - gt) * (1 - mask)).sum(2).sum(1)[empty]
    union[empty] = mask.shape[-1] * mask.shape[-2]
    return inter / (union + IOU_EPS)


def frame_f_curves(probs: torch.Tensor, gt: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, 255] float32 F curves, [N] bool has-foreground)``; rows without foreground are 0.

    ``Σ[p ≥ t_i]`` for all thresholds at once: bucketize gives each pixel the number of thresholds
    it reaches, and a reversed cumulative histogram counts, per threshold, the pixels that reach it.
    """
    th = thresholds()
    n = probs.shape[0]
    curves = torch.zeros((n, PR_STEPS), dtype=torch.float32)
    has_fg = gt.reshape(n, -1).mean(1) != 0  # the reference skips frames with mean(gt) == 0
    for i in torch.nonzero(has_fg).flatten().tolist():
        reached = torch.bucketize(probs[i].reshape(-1), th, right=True)
        weights = gt[i].reshape(-1).double()
        count = torch.bincount(reached, minlength=PR_STEPS + 1).flip(0).cumsum(0).flip(0)[1:]
        tp = torch.bincount(reached, weights=weights, minlength=PR_STEPS + 1).flip(0).cumsum(0).flip(0)[1:]
        tp, count = tp.float(), count.float()
        prec = tp / (count + PR_EPS)
        recall = tp / (gt[i].sum() + PR_EPS)
        f = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f[torch.isnan(f)] = 0
        curves[i] = f
    return curves, has_fg


class FrameBatcher:
    """Groups frames into reference batches of ``batch_size`` videos and keeps summable totals.

    A video is a run of consecutive frames with the same id (``videos`` passed per update) or,
    without ids, ``frames_per_video`` consecutive frames. Frames of a batch still open are held in
    ``pending`` until the batch is complete (the next video starts) or ``flush()`` closes it.
    """

    SUMMABLE = (
        "frames",
        "iou_sum",
        "f_frames",
        "f_curve_sum",
        "fg_sum",
        "pixel_sum",
        "batches",
        "batch_iou_sum",
        "batch_f_sum",
        "batch_null_sum",
    )

    def __init__(self, batch_size: int | None, frames_per_video: int):
        self.batch_size = batch_size
        self.frames_per_video = frames_per_video
        self.state = {name: 0.0 for name in self.SUMMABLE}
        self.state["f_curve_sum"] = np.zeros(PR_STEPS, dtype=np.float64)
        self.pending: list[tuple] = []  # (video id, iou, curve or None, foreground, pixels)
        self._auto_video = 0

    def _video_ids(self, n: int, videos) -> list:
        if videos is not None:
            if len(videos) != n:
                raise ValueError(f"videos has {len(videos)} ids for {n} frames")
            return list(videos)
        ids = [("auto", (self._auto_video + k) // self.frames_per_video) for k in range(n)]
        self._auto_video += n
        return ids

    def add(self, iou, curves, has_fg, foreground, pixels: int, videos=None) -> None:
        n = len(iou)
        ids = self._video_ids(n, videos)
        self.state["frames"] += n
        self.state["iou_sum"] += float(iou.double().sum())
        self.state["f_frames"] += int(has_fg.sum())
        if curves is not None:
            self.state["f_curve_sum"] += curves[has_fg].double().sum(0).numpy()
        self.state["fg_sum"] += float(foreground.double().sum())
        self.state["pixel_sum"] += pixels * n
        if self.batch_size is None:
            return
        for k in range(n):
            self._maybe_close(ids[k])
            curve = curves[k] if curves is not None and bool(has_fg[k]) else None
            self.pending.append((ids[k], float(iou[k]), curve, float(foreground[k]), pixels))

    def _maybe_close(self, next_video) -> None:
        if not self.pending or self.pending[-1][0] == next_video:
            return
        videos = len({frame[0] for frame in self.pending})  # runs are consecutive, so ids are distinct
        if videos >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Close the open batch (the reference's last, partial batch counts like any other)."""
        if not self.pending:
            return
        ious = [frame[1] for frame in self.pending]
        curves = [frame[2] for frame in self.pending if frame[2] is not None]
        self.state["batches"] += 1
        self.state["batch_iou_sum"] += float(np.mean(ious))
        self.state["batch_f_sum"] += float(torch.stack(curves).double().mean(0).max()) if curves else 0.0
        fg = sum(frame[3] for frame in self.pending)
        pixels = sum(frame[4] for frame in self.pending)
        self.state["batch_null_sum"] += math.sqrt(fg / pixels)
        self.pending = []
