"""Per-class quantities of the semantic protocols.

``frame_class_scores`` follows AVSBench ``avs_scripts/avss/utils/compute_color_metrics.py``
(``_batch_miou_fscore``): per frame, histograms over the C classes of the intersection
(pred == gt), the prediction and the label; union = pred + label − inter;
iou_c = inter / (2.22e−16 + union) and F_c = (1 + β²)·P·R / (β²·P + R) with P = inter/pred,
R = inter/label and NaN → 0, both in float32; a class "counts" in a frame when its union is > 0.
The prediction is counted at every pixel whose label is ≥ 0, the label only where it is a class
index in [0, C) — so an ignore value such as 255 still charges the prediction there, as in the
original (its ``histc`` drops the out-of-range label but not the prediction).

``confusion`` is the dataset-level confusion matrix of CAVP ``utils/eval_utils.py``
(``ForegroundDetect._fast_hist``): rows = ground truth, columns = prediction, pixels whose label is
outside [0, C) or equal to ``ignore_index`` left out.
"""

from __future__ import annotations

import numpy as np
import torch

AVSS_EPS = 2.220446049250313e-16


def frame_class_scores(labels: torch.Tensor, gt: torch.Tensor, num_classes: int, beta2: float):
    """``(iou [N, C], fscore [N, C], counted [N, C])`` float32 / bool for predicted class labels."""
    n = labels.shape[0]
    ious = torch.zeros((n, num_classes), dtype=torch.float32)
    fscores = torch.zeros((n, num_classes), dtype=torch.float32)
    counted = torch.zeros((n, num_classes), dtype=torch.bool)
    for i in range(n):
        pred, lab = labels[i].reshape(-1), gt[i].reshape(-1).long()
        charged = pred[lab >= 0]
        known = (lab >= 0) & (lab < num_classes)
        area_pred = torch.bincount(charged, minlength=num_classes).float()
        area_lab = torch.bincount(lab[known], minlength=num_classes).float()
        area_inter = torch.bincount(pred[known & (pred == lab)], minlength=num_classes).float()
        area_union = area_pred + area_lab - area_inter
        ious[i] = 1.0 * area_inter / (AVSS_EPS + area_union)
        counted[i] = area_union > 0
        precision = area_inter / area_pred
        recall = area_inter / area_lab
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        f[torch.isnan(f)] = 0.0
        fscores[i] = f
    return ious, fscores, counted


def confusion(labels: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """``[C, C]`` int64 pixel counts (row = ground truth class, column = predicted class)."""
    lab = gt.reshape(-1).long()
    pred = labels.reshape(-1).long()
    keep = (lab >= 0) & (lab < num_classes)
    if ignore_index is not None:
        keep &= lab != ignore_index
    flat = torch.bincount(num_classes * lab[keep] + pred[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).numpy().astype(np.int64)


def class_labels(pred: torch.Tensor, kind: str) -> torch.Tensor:
    """``[N, H, W]`` int64 class labels: argmax over the softmax of ``[N, C, H, W]`` logits (the
    reference takes the argmax of ``torch.softmax``, whose float32 ties decide like it does), or
    labels as given."""
    if kind == "labels":
        return pred.long()
    if kind == "logits":
        return torch.argmax(torch.softmax(pred.float(), dim=1), dim=1)
    return torch.argmax(pred.float(), dim=1)  # probabilities
