"""Turning what callers pass (numpy arrays or tensors; logits, probabilities, masks or labels)
into the float32 / int64 CPU tensors the protocols compute on, and the ``eval_size`` resize.

Resize rule (``eval_size``): scores (logits, probabilities) are resized **bilinearly**
(``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, as bias_in_AVS, SegPref
and Ref-AVS resize their Mask2Former outputs to 256×256); ground truth, binary masks and class labels
by **nearest neighbour at pixel centres** (``mode="nearest-exact"``, which samples like PIL's
``Image.NEAREST`` used by the AVSBench loaders).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PRED_KINDS = ("logits", "probabilities", "mask", "labels")


class MetricInputError(ValueError):
    """Inputs that do not fit the protocol (shape, kind, option)."""


def as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, (list, tuple)):
        return torch.from_numpy(np.asarray(value))
    raise MetricInputError(f"{name} must be a numpy array or a torch tensor, not {type(value).__name__}")


def size_pair(eval_size) -> tuple[int, int] | None:
    if eval_size is None:
        return None
    if isinstance(eval_size, int):
        return (eval_size, eval_size)
    height, width = eval_size
    return (int(height), int(width))


def resize_scores(scores: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of ``[N, H, W]`` or ``[N, C, H, W]`` float scores to ``size`` (H, W)."""
    if size is None or tuple(scores.shape[-2:]) == size:
        return scores
    planes = scores.unsqueeze(1) if scores.dim() == 3 else scores
    out = F.interpolate(planes.float(), size=size, mode="bilinear", align_corners=False)
    return out.squeeze(1) if scores.dim() == 3 else out


def resize_labels(labels: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest (pixel-centre) resize of ``[N, H, W]`` labels or masks, keeping their dtype."""
    if size is None or tuple(labels.shape[-2:]) == size:
        return labels
    out = F.interpolate(labels.unsqueeze(1).double(), size=size, mode="nearest-exact")
    return out.squeeze(1).to(labels.dtype)


def check_frames(pred: torch.Tensor, gt: torch.Tensor, channels: bool) -> None:
    want = 4 if channels else 3
    if pred.dim() != want:
        layout = "[N, C, H, W]" if channels else "[N, H, W]"
        raise MetricInputError(f"pred must be {layout}, got shape {tuple(pred.shape)}")
    if gt.dim() != 3:
        raise MetricInputError(f"gt must be [N, H, W], got shape {tuple(gt.shape)}")
    if pred.shape[0] != gt.shape[0] or pred.shape[-2:] != gt.shape[-2:]:
        raise MetricInputError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in frames or size (use eval_size)")


def binary_gt(gt, size) -> torch.Tensor:
    """Ground truth of a binary protocol as float32 (the reference multiplies float masks);
    0/255 masks become 0/1."""
    tensor = as_tensor(gt, "gt")
    if tensor.dim() == 4 and tensor.shape[1] == 1:  # [N, 1, H, W]
        tensor = tensor[:, 0]
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    if tensor.numel() and float(tensor.max()) > 1:
        tensor = (tensor > 0).to(torch.uint8)
    return resize_labels(tensor, size).float()


def mask_from(pred: torch.Tensor) -> torch.Tensor:
    """A binary prediction (bool, 0/1 or 0/255) as int32 0/1."""
    if pred.dtype == torch.bool:
        return pred.int()
    if pred.numel() and not bool(((pred == 0) | (pred == 1) | (pred == 255)).all()):
        raise MetricInputError("pred_kind='mask' needs values in {0, 1} or {0, 255}")
    return (pred > 0).int()
