"""The named protocols, their accumulator and ``evaluate``.

Every protocol is computed by an ``Accumulator``: ``update`` per batch of frames, ``compute`` at the
end; one ``evaluate`` call on the whole set is the same accumulator fed in chunks, so both give the
same numbers. ``state_dict()`` holds only summable numbers and numpy arrays (DDP: sum each field
over ranks, ``load_state_dict`` the sums, ``compute``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from soundstage.manifests.palette import NUM_CLASSES
from soundstage.metrics.binary import FrameBatcher, frame_f_curves, frame_iou
from soundstage.metrics.inputs import (
    PRED_KINDS,
    MetricInputError,
    as_tensor,
    binary_gt,
    check_frames,
    mask_from,
    resize_labels,
    resize_scores,
    size_pair,
)
from soundstage.metrics.semantic import class_labels, confusion, frame_class_scores

AGGREGATIONS = {"set": None, "video": 1, "paper": "paper"}  # name -> batch_size (in videos); paper: the protocol's own


@dataclass(frozen=True)
class Protocol:
    """One named way to score predictions; ``doc`` states its rules and upstream source."""

    name: str
    kind: str  # binary | semantic | confusion | null
    doc: str
    defaults: dict = field(default_factory=dict)
    paper_eval_size: int | None = None
    # the batch (in videos) behind the published numbers (aggregation="paper"); the defaults of
    # avsbench-binary and refavs-null score the whole set at once instead
    paper_batch_size: int | None = None


def _binary(name, doc, paper_eval_size, paper_batch_size, **defaults):
    base = {"threshold": 0.5, "beta2": 0.3, "batch_size": None, "frames_per_video": 5, "two_channel": False}
    return Protocol(name, "binary", doc, {**base, **defaults}, paper_eval_size, paper_batch_size)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        _binary(
            "avsbench-binary",
            "AVSBench S4/MS3 (OpenNLPLab/AVSBench avs_scripts/avs_s4/utils/utility.py mask_iou and "
            "Eval_Fmeasure, test.py): pred = logits [N,H,W]; IoU of sigmoid > 0.5, a frame with empty "
            "ground truth scores its true negatives / (H·W); F: β² 0.3, 255 thresholds "
            "linspace(0, 1−1e−10), empty-GT frames skipped, max over thresholds of the mean curve. "
            "batch_size (in videos of frames_per_video frames): None = the whole set as one batch; "
            "4 = the published numbers (test.sh --test_batch_size 4: 20 frames per batch, per-batch "
            "values averaged, last partial batch included).",
            224,
            4,
        ),
        _binary(
            "bias-in-avs",
            "bias_in_AVS (GeWu-Lab/bias_in_AVS AVS/utils/v1m/utility.py, AVS/scripts/train.py): the "
            "AVSBench rules with IoU threshold sigmoid > 0.4 and F β² 0.1, scored per video "
            "(batch_size 1) and averaged over videos; logits bilinearly resized to 256×256.",
            256,
            1,
            threshold=0.4,
            beta2=0.1,
            batch_size=1,
        ),
        _binary(
            "stepping-stones",
            "Stepping Stones (GeWu-Lab/Stepping-Stones avs/utils/utility.py, avs/scripts/evaluation.py): "
            "pred = two-channel logits [N,2,H,W] (background, sounding); IoU of argmax over the "
            "channels (ties → background), F (β² 0.3, AVSBench sweep) on sigmoid(2·l1 − l0); per "
            "video (--bs 1) averaged over videos; 224×224.",
            224,
            1,
            batch_size=1,
            two_channel=True,
        ),
        _binary(
            "segpref",
            "SegPref (GeWu-Lab/Sounding-Object-Segmentation-Preference SegPref/utils/metric/utility.py, "
            "SegPref/scripts/train.py, run_avs.py): the AVSBench rules with IoU threshold sigmoid > 0.4 "
            "and F β² 0.3, per batch of 4 clips averaged over batches; logits at 256×256.",
            256,
            4,
            threshold=0.4,
            batch_size=4,
        ),
        Protocol(
            "avsbench-semantic",
            "semantic",
            "AVSBench AVSS (OpenNLPLab/AVSBench avs_scripts/avss/utils/compute_color_metrics.py "
            "_batch_miou_fscore, avss/test.py): pred = logits [N,C,H,W] (argmax of softmax) or class "
            "labels; per class, IoU and F (β² 0.3, no sweep) summed over frames and divided by the "
            "number of frames where the class's union is non-empty. miou/fscore: mean over all C "
            "classes, absent ones as 0 (test.py's final line); miou_present/fscore_present: over the "
            "classes seen (its per-iteration print); *_nobg_reference: test.py's 'noBg' mean, which "
            "drops the LAST class (index C−1), not background — kept as the quirk it is; "
            "*_no_background: the corrected mean without class 0.",
            {"beta2": 0.3, "num_classes": None},
            224,
        ),
        Protocol(
            "cavp-dataset",
            "confusion",
            "Dataset-level confusion matrix (as CAVP reports, cyh-0/CAVP utils/eval_utils.py MIoU and "
            "ForegroundDetect): one C×C pixel confusion matrix over the whole set (labels equal to "
            "ignore_index 255 or outside [0, C) left out); IoU_c = tp / (eps + tp + fp + fn) averaged "
            "over all C classes; F_β = (1+β²)tp / ((1+β²)tp + β²fn + fp) and FDR = fp / (fp + tp) "
            "averaged over classes where they are defined (NaN-mean); fscore uses β² 0.3, f1 β² 1. "
            "Binary logits [N,H,W] become 2 classes by sigmoid > threshold. CAVP prints these "
            "rounded to 4 decimals; here they are not rounded.",
            {"num_classes": None, "ignore_index": 255, "threshold": 0.5, "beta2": 0.3, "class_list": None},
            None,
        ),
        Protocol(
            "refavs-null",
            "null",
            "Ref-AVS null-set score (GeWu-Lab/Ref-AVS utils/metric/utility.py metric_s_for_null, "
            "scripts/train.py): S = sqrt(Σ foreground / Σ pixels) of sigmoid > 0.5 — lower is better, "
            "for references to objects that are not in the clip (empty ground truth). Ref-AVS "
            "averages S over test batches of 4 clips (batch_size=4, frames_per_video=10); "
            "batch_size None = one S over the whole set. gt is not used.",
            {"threshold": 0.5, "batch_size": None, "frames_per_video": 10},
            256,
            4,
        ),
    )
}

COMMON_OPTIONS = ("eval_size", "pred_kind", "aggregation")


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise MetricInputError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _options(proto: Protocol, options: dict) -> dict:
    unknown = set(options) - set(proto.defaults) - set(COMMON_OPTIONS)
    if unknown:
        raise MetricInputError(
            f"protocol {proto.name} has no option {', '.join(sorted(unknown))}; "
            f"options: {', '.join(sorted({*proto.defaults, *COMMON_OPTIONS}))}"
        )
    merged = {**proto.defaults, "eval_size": None, "pred_kind": None, **options}
    aggregation = merged.pop("aggregation", None)
    if aggregation is not None:
        if "batch_size" not in proto.defaults or aggregation not in AGGREGATIONS:
            raise MetricInputError(f"protocol {proto.name} has no aggregation {aggregation!r}")
        size = proto.paper_batch_size if aggregation == "paper" else AGGREGATIONS[aggregation]
        if "batch_size" in options and options["batch_size"] != size:
            raise MetricInputError(f"aggregation={aggregation!r} contradicts batch_size={options['batch_size']}")
        merged["batch_size"] = size
    if merged["pred_kind"] is not None and merged["pred_kind"] not in PRED_KINDS:
        raise MetricInputError(f"pred_kind must be one of {', '.join(PRED_KINDS)}, not {merged['pred_kind']!r}")
    return merged


def aggregation(proto: Protocol, options: dict) -> str:
    """How the protocol's per-frame numbers became its result, in words (printed with each
    number: the same predictions give different numbers under different aggregations)."""
    if proto.kind == "semantic":
        return "per class: sums over frames, mean over classes"
    if proto.kind == "confusion":
        return "one confusion matrix over the set"
    batch = options.get("batch_size")
    if batch is None:
        return "the whole set as one batch"
    if batch == 1:
        return "per video, mean over videos"
    return f"per batch of {batch} videos, mean over batches"


def _default_kind(pred: torch.Tensor, integer_kind: str) -> str:
    return "logits" if pred.is_floating_point() else integer_kind


class Accumulator:
    """Running state of one protocol: ``update(pred, gt, videos=None)`` per batch, ``compute()``.

    ``videos`` (optional, one id per frame) marks which consecutive frames form a video, for the
    protocols that batch by videos; without it every ``frames_per_video`` frames are one video.
    """

    def __init__(self, name: str, **options):
        self.protocol = protocol(name)
        self.options = _options(self.protocol, options)
        self.size = size_pair(self.options["eval_size"])
        self.kinds_seen: set[str] = set()
        kind = self.protocol.kind
        if kind in ("binary", "null"):
            self.batcher = FrameBatcher(self.options["batch_size"], self.options["frames_per_video"])
        elif kind == "semantic":  # with num_classes unknown, created on the first update
            self.sums = None if self.options["num_classes"] is None else self._empty_sums(self.options["num_classes"])
        else:
            classes = self.options["num_classes"]
            self.matrix = None if classes is None else np.zeros((classes, classes), dtype=np.int64)

    @staticmethod
    def _empty_sums(classes: int) -> dict:
        zeros = np.zeros(classes)
        return {"frames": 0, "num_classes": classes, "iou_sum": zeros, "f_sum": zeros.copy(), "class_frames": zeros.copy()}

    # -- feeding ------------------------------------------------------------------------------
    def update(self, pred, gt=None, videos=None) -> None:
        pred = as_tensor(pred, "pred")
        kind = self.protocol.kind
        if kind in ("binary", "null"):
            self._update_binary(pred, gt, videos)
        elif kind == "semantic":
            self._update_semantic(pred, gt)
        else:
            self._update_confusion(pred, gt)

    def _binary_inputs(self, pred: torch.Tensor):
        """``(iou mask int [N,H,W], probabilities for the F sweep or None, kind)``."""
        opts = self.options
        kind = opts["pred_kind"] or _default_kind(pred, "mask")
        two_channel = opts.get("two_channel", False)
        if pred.dim() == 4 and pred.shape[1] == 1:  # [N, 1, H, W], as models output
            pred = pred[:, 0]
        if kind == "logits" and two_channel:
            check_frames(pred, pred[:, 0], channels=True)
            if pred.shape[1] != 2:
                raise MetricInputError(f"{self.protocol.name} needs two-channel logits [N,2,H,W], got {tuple(pred.shape)}")
            logits = resize_scores(pred.float(), self.size)
            return logits.argmax(1).int(), torch.sigmoid(2 * logits[:, 1] - logits[:, 0]), kind
        if pred.dim() != 3:
            raise MetricInputError(f"pred ({kind}) must be [N, H, W], got shape {tuple(pred.shape)}")
        if kind == "mask":
            return mask_from(resize_labels(pred, self.size)), None, kind
        scores = resize_scores(pred.float(), self.size)
        probs = torch.sigmoid(scores) if kind == "logits" else scores
        threshold = 0.5 if two_channel else opts["threshold"]  # argmax of 2 channels = p(sounding) > 0.5
        return (probs > threshold).int(), (None if two_channel else probs), kind

    def _update_binary(self, pred, gt, videos) -> None:
        mask, probs, kind = self._binary_inputs(pred)
        self.kinds_seen.add(kind)
        n, pixels = mask.shape[0], mask.shape[-1] * mask.shape[-2]
        if self.protocol.kind == "null":
            zeros = torch.zeros(n)
            self.batcher.add(zeros, None, torch.zeros(n, dtype=torch.bool), mask.reshape(n, -1).sum(1), pixels, videos)
            return
        target = binary_gt(gt, self.size)
        check_frames(mask, target, channels=False)
        iou = frame_iou(mask, target)
        # without scores, the sweep runs on the 0/1 mask: what the reference gives for such input
        curves, has_fg = frame_f_curves(probs if probs is not None else mask.float(), target, self.options["beta2"])
        self.batcher.add(iou, curves, has_fg, mask.reshape(n, -1).sum(1), pixels, videos)

    def _labels(self, pred: torch.Tensor) -> torch.Tensor:
        kind = self.options["pred_kind"] or _default_kind(pred, "labels")
        self.kinds_seen.add(kind)
        if kind == "mask":
            return resize_labels(mask_from(pred), self.size).long()
        if kind == "labels":
            return resize_labels(pred, self.size).long()
        if pred.dim() == 3:  # binary scores: foreground where p > threshold
            probs = torch.sigmoid(pred.float()) if kind == "logits" else pred.float()
            threshold = self.options.get("threshold", 0.5)
            return (resize_scores(probs, self.size) > threshold).long()
        return class_labels(resize_scores(pred, self.size), kind)

    def _num_classes(self, pred: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> int:
        given = self.options["num_classes"]
        if given is not None:
            return int(given)
        if pred.dim() == 4:
            return int(pred.shape[1])
        if pred.is_floating_point():  # binary scores thresholded into background / foreground
            return 2
        if self.protocol.name == "avsbench-semantic":
            return NUM_CLASSES
        known = target[(target >= 0) & (target != self.options.get("ignore_index", -1))]
        if int(labels.max()) <= 1 and (known.numel() == 0 or int(known.max()) <= 1):
            return 2
        raise MetricInputError(f"{self.protocol.name}: pass num_classes= with class-label predictions")

    def _gt_labels(self, gt) -> torch.Tensor:
        if gt is None:
            raise MetricInputError(f"{self.protocol.name} needs gt")
        target = resize_labels(as_tensor(gt, "gt"), self.size)
        return target.long() if not target.is_floating_point() else target

    def _update_semantic(self, pred, gt) -> None:
        labels, target = self._labels(pred), self._gt_labels(gt)
        check_frames(labels, target, channels=False)
        classes = self._num_classes(pred, labels, target)
        if self.sums is None:
            self.sums = self._empty_sums(classes)
        ious, fscores, counted = frame_class_scores(labels, target, classes, self.options["beta2"])
        self.sums["frames"] += labels.shape[0]
        self.sums["iou_sum"] += ious.double().sum(0).numpy()
        self.sums["f_sum"] += fscores.double().sum(0).numpy()
        self.sums["class_frames"] += counted.sum(0).numpy()

    def _update_confusion(self, pred, gt) -> None:
        labels, target = self._labels(pred), self._gt_labels(gt)
        check_frames(labels, target, channels=False)
        classes = self._num_classes(pred, labels, target)
        if self.matrix is None:
            self.matrix = np.zeros((classes, classes), dtype=np.int64)
        self.matrix += confusion(labels, target, classes, self.options["ignore_index"])

    # -- state (summable) ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Summable totals (numbers and numpy arrays). For the batched protocols this first closes
        the open batch, as the reference does with its last partial batch: call it once, at the
        end. Fields: binary/null — frames, iou_sum, f_frames, f_curve_sum[255], fg_sum, pixel_sum,
        batches, batch_iou_sum, batch_f_sum, batch_null_sum; semantic — frames, num_classes (sum
        gives ranks × C: divide, or pass it from one rank), iou_sum[C], f_sum[C], class_frames[C];
        confusion — matrix[C, C]."""
        kind = self.protocol.kind
        if kind in ("binary", "null"):
            self.batcher.flush()
            state = dict(self.batcher.state)
            state["f_curve_sum"] = state["f_curve_sum"].copy()
            return state
        if kind == "semantic":
            return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in (self.sums or {}).items()}
        return {"matrix": None if self.matrix is None else self.matrix.copy()}

    def load_state_dict(self, state: dict, ranks: int = 1) -> None:
        """Replace the totals with ``state`` (e.g. summed over ``ranks`` DDP ranks)."""
        kind = self.protocol.kind
        if kind in ("binary", "null"):
            self.batcher.pending = []
            self.batcher.state = {
                k: (np.asarray(v, dtype=np.float64) if k == "f_curve_sum" else float(v)) for k, v in state.items()
            }
        elif kind == "semantic":
            self.sums = {k: np.asarray(v, dtype=np.float64) if isinstance(v, np.ndarray) else v for k, v in state.items()}
            if self.sums:
                self.sums["num_classes"] = int(state["num_classes"]) // ranks
        else:
            self.matrix = None if state["matrix"] is None else np.asarray(state["matrix"], dtype=np.int64)

    # -- result -------------------------------------------------------------------------------
    def compute(self) -> dict:
        state = self.state_dict()
        result = {
            "protocol": self.protocol.name,
            "options": self._reported_options(),
            "aggregation": aggregation(self.protocol, self.options),
            "notes": [],
        }
        kind = self.protocol.kind
        if kind == "binary":
            result.update(self._binary_result(state))
        elif kind == "null":
            result.update(_null_result(state, self.options["batch_size"]))
        elif kind == "semantic":
            result.update(_semantic_result(state))
        else:
            result.update(_confusion_result(state, self.options))
        if not (result.get("frames") or result.get("pixels")):
            result["notes"].append("no frames were evaluated")
        return result

    def _reported_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k != "two_channel"}

    def _binary_result(self, state: dict) -> dict:
        batched = self.options["batch_size"] is not None
        if batched:
            batches = max(state["batches"], 1.0)
            miou, fscore = state["batch_iou_sum"] / batches, state["batch_f_sum"] / batches
        else:
            miou = state["iou_sum"] / max(state["frames"], 1.0)
            fscore = float((state["f_curve_sum"] / state["f_frames"]).max()) if state["f_frames"] else 0.0
        out = {
            "miou": miou,
            "fscore": fscore,
            "frames": int(state["frames"]),
            "frames_with_foreground": int(state["f_frames"]),
            "batches": int(state["batches"]) if batched else 1,
            "notes": [],
        }
        if "mask" in self.kinds_seen:
            out["fscore_of_mask"], out["fscore"] = fscore, None
            out["notes"].append(
                "F needs scores (logits or probabilities) for its threshold sweep and got binary masks: "
                "fscore is None; fscore_of_mask = the sweep run on the 0/1 mask"
            )
        elif self.options.get("two_channel") and self.kinds_seen != {"logits"}:
            out["fscore"] = None
            out["notes"].append("F needs the two-channel logits (sigmoid(2·l1 − l0)): fscore is None; IoU used p > 0.5")
        return out


def _null_result(state: dict, batch_size) -> dict:
    if batch_size is not None:
        score = state["batch_null_sum"] / max(state["batches"], 1.0)
    else:
        score = math.sqrt(state["fg_sum"] / state["pixel_sum"]) if state["pixel_sum"] else 0.0
    return {"null_score": score, "frames": int(state["frames"]), "batches": int(state["batches"]) if batch_size else 1}


def _nan_to_zero(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), 0.0, values)


def _semantic_result(state: dict) -> dict:
    if not state:
        return {"miou": 0.0, "fscore": 0.0, "frames": 0}
    counts = state["class_frames"]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou_pc = _nan_to_zero(state["iou_sum"] / counts)
        f_pc = _nan_to_zero(state["f_sum"] / counts)
    present = int((counts != 0).sum())
    return {
        "miou": float(iou_pc.mean()),
        "fscore": float(f_pc.mean()),
        "miou_present": float(iou_pc.sum() / present) if present else 0.0,
        "fscore_present": float(f_pc.sum() / present) if present else 0.0,
        "miou_nobg_reference_drops_last_class": float(iou_pc[:-1].mean()),
        "fscore_nobg_reference_drops_last_class": float(f_pc[:-1].mean()),
        "miou_no_background": float(iou_pc[1:].mean()),
        "fscore_no_background": float(f_pc[1:].mean()),
        "classes_present": present,
        "frames": int(state["frames"]),
        "per_class_iou": iou_pc.tolist(),
        "per_class_fscore": f_pc.tolist(),
    }


def _confusion_result(state: dict, options: dict) -> dict:
    matrix = state["matrix"]
    if matrix is None:
        return {"miou": 0.0, "fscore": 0.0, "pixels": 0}
    cm = matrix.astype(np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    iou = tp / (np.spacing(1) + tp + fp + fn)
    pick = options["class_list"]
    sel = (lambda v: v[list(pick)]) if pick is not None else (lambda v: v)
    tp_s, fp_s, fn_s = sel(tp), sel(fp), sel(fn)

    def f_beta(beta2):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _nanmean(((1 + beta2) * tp_s) / ((1 + beta2) * tp_s + beta2 * fn_s + fp_s))

    with np.errstate(divide="ignore", invalid="ignore"):
        fdr = _nanmean(fp_s / (fp_s + tp_s))
    return {
        "miou": float(sel(iou).mean()),
        "pixel_accuracy": float(tp.sum() / (np.spacing(1) + cm.sum())),
        "fscore": f_beta(options["beta2"]),
        "f1": f_beta(1.0),
        "fdr": fdr,
        "pixels": int(cm.sum()),
        "per_class_iou": iou.tolist(),
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


CHUNK_FRAMES = 16  # evaluate feeds the accumulator in chunks to bound memory; the sums are the same


def evaluate(protocol_name: str, pred, gt=None, *, videos=None, **options) -> dict:
    """Score ``pred`` against ``gt`` by the named protocol (see ``PROTOCOLS[name].doc``).

    ``pred``/``gt``: numpy arrays or tensors with frames first. ``pred_kind`` ("logits",
    "probabilities", "mask", "labels") defaults to logits for float input and masks / labels for
    integer or bool input. Returns a dict with at least ``miou`` and ``fscore`` (``null_score`` for
    refavs-null), the options used and ``notes`` saying what could not be computed as specified.
    """
    acc = Accumulator(protocol_name, **options)
    pred_t = as_tensor(pred, "pred")
    gt_t = None if gt is None else as_tensor(gt, "gt")
    for start in range(0, pred_t.shape[0], CHUNK_FRAMES):
        stop = start + CHUNK_FRAMES
        acc.update(
            pred_t[start:stop],
            None if gt_t is None else gt_t[start:stop],
            None if videos is None else list(videos)[start:stop],
        )
    return acc.compute()
