"""What the report pages share: scoring a saved run on a split under every audio variant, the
clip pictures (frames with prediction and ground truth, a spectrogram strip of the audio under
them) and the HTML pieces. ``soundstage.train.report`` writes the page of one run,
``soundstage.train.compare`` the page comparing several.

Overlays: the prediction is hatched and outlined *inside* its region in yellow, the ground truth
outlined *outside* its region in cyan, each line with a black rim — a bright line on black is
visible on any object colour (dark, bright or saturated), and the two outlines never cover each
other where prediction and truth agree. Semantic runs hatch each class in its palette colour.

Spectrogram strips: under each shown frame, the log-mel spectrogram (the VGGish front end:
64 mel bands, 125 Hz–7.5 kHz, low frequencies at the bottom) of that frame's second of audio,
on one colour scale per clip, so a source switching on or off reads as a change between tiles.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

import soundstage.train.assemble as assemble
from soundstage.audio import load_audio
from soundstage.device import resolve_device
from soundstage.manifests.palette import index_to_colour
from soundstage.manifests.table import frame_path, resolve_path
from soundstage.metrics import Accumulator
from soundstage.models.vggish import log_mel
from soundstage.pipeline.stage import ClipError
from soundstage.train.data import collate_frames, frame_clip_ids
from soundstage.train.evaluation import DEFAULT_PROTOCOL
from soundstage.train.recipes import get_recipe
from soundstage.train.run_dir import RunDir
from soundstage.train.run_eval import load_run, run_model

VARIANTS = ("real", "muted", "zeroed", "swapped", "noise:10")
PROTOCOLS = {
    "binary": ("avsbench-binary", "bias-in-avs", "stepping-stones", "segpref"),
    "semantic": ("avsbench-semantic", "cavp-dataset"),
}
SHOWN_FRAMES = 5  # frames per clip in a strip
DISPLAY = 128  # pixels per frame in the strips
SPECTROGRAM_HEIGHT = 56
PREDICTION_COLOUR = (255, 225, 0)
TRUTH_COLOUR = (0, 215, 255)
RIM = (0, 0, 0)
MEL_FRAMES_PER_SECOND = 100  # the VGGish front end's 10 ms hop


# ---------------------------------------------------------------------------- scoring


def clip_iou(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over frames of the IoU of non-background pixels (1 when both are empty)."""
    scores = []
    for p, g in zip(pred != 0, labels != 0):
        union = np.logical_or(p, g).sum()
        scores.append(1.0 if union == 0 else float(np.logical_and(p, g).sum() / union))
    return float(np.mean(scores))


class Scorer:
    """Runs the model over a dataset and feeds every protocol, per subset and per clip."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg, self.device = model, cfg, device
        self.predict = get_recipe(cfg.recipe).predict
        self.gt_classes: set[int] = set()  # classes the scored ground truth holds

    @torch.no_grad()
    def outputs(self, data, indices=None):
        """Yield (clip_ids of the frames, frame indices, log class scores [N, C, H, W], labels)."""
        subset = data if indices is None else torch.utils.data.Subset(data, indices)
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.cfg.eval_batch_size, shuffle=False, collate_fn=collate_frames
        )
        self.model.eval()
        for batch in loader:
            labels = batch["labels"]
            # two_channel: the recipe's per-class log-scores (what the Stepping Stones protocol takes)
            scores = self.predict(self.model, batch, self.device, tuple(labels.shape[-2:]), self.cfg.task, True).float().cpu()
            yield frame_clip_ids(batch), batch["frames"], scores, labels

    def score(self, data, subsets: dict) -> tuple[dict, dict, dict]:
        """{protocol: result}, {subset: primary protocol result}, {clip_id: clip IoU}."""
        task = self.cfg.task
        options = {"pred_kind": "logits"}
        if task == "semantic":
            options["num_classes"] = self.model.config.num_labels
        overall = {p: Accumulator(p, **options) for p in PROTOCOLS[task]}
        primary = primary_protocol(self.cfg)
        per_subset = {s: Accumulator(primary, **options) for s in sorted(set(subsets.values()))}
        frames: dict[str, list] = {}
        for clip_ids, _, scores, labels in self.outputs(data):
            self.gt_classes.update(torch.unique(labels).tolist())
            for name, acc in overall.items():
                acc.update(self._pred(scores, name), labels, videos=clip_ids)
            argmax = scores.argmax(1).numpy()
            for s in per_subset:
                pick = [i for i, c in enumerate(clip_ids) if subsets[c] == s]
                if pick:
                    per_subset[s].update(self._pred(scores[pick], primary), labels[pick], videos=[clip_ids[i] for i in pick])
            for i, cid in enumerate(clip_ids):
                frames.setdefault(cid, []).append((argmax[i], labels[i].numpy()))
        clips = {cid: clip_iou(np.stack([p for p, _ in f]), np.stack([g for _, g in f])) for cid, f in frames.items()}
        return {n: a.compute() for n, a in overall.items()}, {s: a.compute() for s, a in per_subset.items()}, clips

    def predicted(self, data, indices) -> dict:
        """clip_id -> {frame: (argmax class map, labels)} of the clips at ``indices``."""
        out: dict = {}
        for clip_ids, frames, scores, labels in self.outputs(data, indices):
            argmax = scores.argmax(1).numpy()
            for i, cid in enumerate(clip_ids):
                out.setdefault(cid, {})[int(frames[i])] = (argmax[i], labels[i].numpy())
        return out

    def _pred(self, scores: torch.Tensor, protocol: str) -> torch.Tensor:
        if self.cfg.task == "semantic" or protocol == "stepping-stones":
            return scores
        return scores[:, 1] - scores[:, 0]


def primary_protocol(cfg) -> str:
    return cfg.protocol or DEFAULT_PROTOCOL[cfg.task]


@dataclass
class ScoredRun:
    """A saved run scored on one split under every audio variant it has a cue for."""

    run: RunDir
    cfg: object
    recorded: dict
    weights: str  # where the weights came from
    best: dict | None  # model/best/best.json, when the run keeps a best model
    split: str
    scorer: Scorer
    datasets: dict  # variant -> dataset
    results: dict  # variant -> protocol -> result
    per_subset: dict  # variant -> subset -> result
    clips: dict  # variant -> clip_id -> clip IoU

    @property
    def name(self) -> str:
        return os.path.basename(self.run.path)

    @property
    def real(self):
        return self.datasets["real"]

    @property
    def rows(self) -> dict:
        return {r["clip_id"]: r for r in self.real.rows}

    def gap(self, variant: str, key: str = "miou") -> float | None:
        """real − ``variant`` under the primary protocol (None without that variant)."""
        if variant not in self.results:
            return None
        primary = primary_protocol(self.cfg)
        return self.results["real"][primary].get(key) - self.results[variant][primary].get(key)


def score_run(run_path: str, split: str | None = None, device: str = "auto", log=print, weights: str | None = None) -> ScoredRun:
    """Load the run's model (``weights``: best | last; None: best when the run keeps one) and cues
    (the cache outputs it recorded) and score ``split`` (default: the run's evaluation split) with
    every audio variant."""
    run, cfg, recorded = load_run(run_path)
    split = split or cfg.eval_split
    device = resolve_device(device)
    cues = assemble.open_cues(cfg, recorded=recorded, log=lambda *_: None)
    model, source = run_model(run, cfg, cues, weights)
    model.to(device).eval()
    recipe = get_recipe(cfg.recipe)

    def clips(variant="real", silence=None):
        return assemble.dataset(
            cfg,
            cues,
            split,
            variant,
            silence=silence,
            num_queries=model.config.num_queries,
            active_encoding=recipe.active_encoding,
        )

    real = clips()
    subsets = {r["clip_id"]: str(r.get("subset", "")) for r in real.rows}
    scorer = Scorer(model, cfg, device)
    datasets, results, per_subset, clip_scores = {"real": real}, {}, {}, {}
    for variant in VARIANTS if "audio" in cues else ("real",):
        if variant != "real":
            silence = assemble.silence_for(run, cues, assemble.max_frames(real), device) if variant == "muted" else None
            datasets[variant] = clips(variant, silence)
        results[variant], per_subset[variant], clip_scores[variant] = scorer.score(datasets[variant], subsets)
        log(f"report: {os.path.basename(run.path)}: scored {split} with {variant} audio")
    best = run.best() if os.path.basename(os.path.normpath(source)) == "best" else None
    return ScoredRun(run, cfg, recorded, source, best, split, scorer, datasets, results, per_subset, clip_scores)


def weights_note(scored: ScoredRun) -> str:
    """Which weights a page shows, in words."""
    note = scored.weights
    if scored.best and os.path.basename(os.path.normpath(scored.weights)) == "best":
        detail = ", ".join(f"{k} {v}" for k, v in scored.best.items() if not isinstance(v, (dict, list)))
        note += f" (best.json: {detail})"
    return note


# ---------------------------------------------------------------------------- pictures


def _resized_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """A class map resized to ``size`` x ``size`` by nearest neighbour."""
    rows = np.arange(size) * labels.shape[0] // size
    cols = np.arange(size) * labels.shape[1] // size
    return labels[rows[:, None], cols[None, :]]


def _band(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` pixels from the mask's edge (negative: inside)."""

    def grown(steps):
        if steps == 0:
            return mask
        op = ndimage.binary_dilation if steps > 0 else ndimage.binary_erosion
        return op(mask, iterations=abs(steps), border_value=0)

    return grown(outer) & ~grown(inner)


def overlay(image: np.ndarray, pred: np.ndarray, labels: np.ndarray | None, semantic: bool) -> np.ndarray:
    """``image [S, S, 3]`` with the prediction hatched and outlined inside (yellow) and the ground
    truth outlined outside (cyan), each line on a black rim (see the module docstring)."""
    size = image.shape[0]
    out = image.astype(np.uint8).copy()
    pred = _resized_labels(pred, size)
    region = pred != 0
    if region.any():
        yy, xx = np.mgrid[:size, :size]
        hatch = region & ((yy + xx) % 6 == 0)
        out[hatch] = index_to_colour(pred)[hatch] if semantic else PREDICTION_COLOUR
        out[_band(region, -3, 1) & ~_band(region, -2, 0)] = RIM
        out[_band(region, -2, 0)] = PREDICTION_COLOUR
    if labels is not None:
        truth = _resized_labels(labels, size) != 0
        if truth.any():
            out[_band(truth, 0, 3) & ~_band(truth, 1, 2)] = RIM
            out[_band(truth, 1, 2)] = TRUTH_COLOUR
    return out


def frame_image(row: dict, frame: int, manifest_dir: str, size: int = DISPLAY) -> np.ndarray:
    with Image.open(frame_path(row, frame, manifest_dir)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def spectrogram_tiles(row: dict, frames: list[int], manifest_dir: str) -> list[np.ndarray] | None:
    """One ``[SPECTROGRAM_HEIGHT, DISPLAY, 3]`` tile per frame: the log-mel of its second of
    audio, on the clip's colour scale; None when the audio cannot be read."""
    try:
        wave = load_audio(resolve_path(row["audio_path"], manifest_dir)).wave
    except (ClipError, KeyError):
        return None
    mel = log_mel(wave)  # [frames at 100 per second, 64]
    if not len(mel):
        return None
    low, high = np.percentile(mel, 1), np.percentile(mel, 99.5)
    colours = _colour_map()
    tiles = []
    for frame in frames:
        second = mel[frame * MEL_FRAMES_PER_SECOND : (frame + 1) * MEL_FRAMES_PER_SECOND]
        if not len(second):  # the audio ends before this frame's second
            tiles.append(np.zeros((SPECTROGRAM_HEIGHT, DISPLAY, 3), np.uint8))
            continue
        level = np.clip((second.T[::-1] - low) / max(high - low, 1e-6), 0, 1)  # [bands, time], low bands at the bottom
        rgb = (colours(level)[..., :3] * 255).astype(np.uint8)
        tiles.append(np.asarray(Image.fromarray(rgb).resize((DISPLAY, SPECTROGRAM_HEIGHT), Image.BILINEAR)))
    return tiles


def _colour_map():
    import matplotlib  # why: heavy, only the report pages draw

    return matplotlib.colormaps["magma"]


def pyplot():
    import matplotlib  # why: heavy, only the report pages draw

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # heavy, only the report pages draw

    return plt


def save_figure(fig, path: str) -> str:
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return os.path.basename(path)


def strip(path: str, tiles: list[np.ndarray]) -> str:
    """Tiles side by side (2 px apart) as one PNG; returns its file name."""
    gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
    row = [t for tile in tiles for t in (tile, gap)][:-1]
    Image.fromarray(np.concatenate(row, axis=1)).save(path)
    return os.path.basename(path)


def shown_frames(predicted: dict) -> list[int]:
    return sorted(predicted)[:SHOWN_FRAMES]


def clip_block(label: str, rows: list[tuple[str, str]], spectrogram: str | None, frames: list[int], out_dir: str) -> str:
    """A clip's HTML: its label, then one titled strip per row (e.g. real / muted audio, or one
    per run) and the spectrogram strip under them, aligned frame by frame."""
    cells = [(title, name) for title, name in rows] + ([("audio", spectrogram)] if spectrogram else [])
    body = "".join(
        f'<tr><th>{html.escape(title)}</th><td><img src="{html.escape(name)}" alt="{html.escape(title)}"></td></tr>'
        for title, name in cells
    )
    frames_text = ", ".join(map(str, frames))
    note = "" if spectrogram else "<p class=note>no spectrogram: the clip's audio could not be read</p>"
    return (
        f"<div class=clip><p class=cliplabel>{html.escape(label)}</p>"
        f"<table class=strip><tr><th></th><td class=frames>frames {frames_text} (one per second)</td></tr>{body}</table>"
        f"{note}</div>"
    )


def clip_label(clip_id: str, row: dict, scores: dict[str, float]) -> str:
    """``clip id · subset · sounding: classes · IoU ...``"""
    parts = [clip_id]
    if row.get("subset"):
        parts.append(str(row["subset"]))
    if row.get("a_obj"):
        parts.append("sounding: " + str(row["a_obj"]).replace("_", ", "))
    parts.append("  ".join(f"{name} IoU {value:.3f}" for name, value in scores.items()))
    return " · ".join(parts)


def spectrogram_strip(row: dict, frames: list[int], manifest_dir: str, path: str) -> str | None:
    tiles = spectrogram_tiles(row, frames, manifest_dir)
    return strip(path, tiles) if tiles else None


def prediction_strip(predicted: dict, frames: list[int], row: dict, manifest_dir: str, semantic: bool, path: str) -> str:
    tiles = [overlay(frame_image(row, f, manifest_dir), *predicted[f], semantic) for f in frames]
    return strip(path, tiles)


# ---------------------------------------------------------------------------- HTML


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "—"
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(name: str | None, alt: str, note: str = "") -> str:
    if not name:
        return f"<p class=note>{html.escape(note or 'not available')}</p>"
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"><figcaption>{html.escape(note)}</figcaption></figure>'
    )


LEGEND = (
    "<p class=legend>Prediction: <b style='color:#b8a000'>yellow</b> hatching and outline inside the predicted region; "
    "ground truth: <b style='color:#0090b0'>cyan</b> outline outside the true region (both on a black rim). "
    "Under the frames: the log-mel spectrogram of each frame's second of audio (low frequencies at the bottom).</p>"
)

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#777}figure{margin:0 0 1.5em}figcaption{color:#555;font-size:.85em}
.clip{margin:0 0 1.2em}.cliplabel{font-size:1.05em;font-weight:600;margin:.2em 0;word-break:break-all}
table.strip td,table.strip th{border:none;padding:1px 6px 1px 0;text-align:left;vertical-align:middle}
table.strip th{background:none;font-weight:normal;color:#444;white-space:nowrap}td.frames{color:#666;font-size:.85em}"""


def write_page(out_dir: str, title: str, sections: list[str]) -> str:
    """``out_dir/index.html`` (written atomically); returns its path."""
    page = os.path.join(out_dir, "index.html")
    text = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    with open(page + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(page + ".tmp", page)
    return page
