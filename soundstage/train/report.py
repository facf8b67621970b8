"""``soundstage report --run runs/NAME --out report/``: one static HTML page about a training run.

``report/index.html`` and the PNG files beside it (no server, no script, no network): open it in
any browser. What is on it:

- the run: settings, the cache outputs it read, how far it got;
- curves: training loss per step, and per evaluation the metrics under every audio variant
  (from ``metrics/*.jsonl``);
- audio sensitivity: the split scored now with the real audio cue and with it muted (the cue of
  digital silence through the same audio model), zeroed, swapped (another clip's) and noised,
  under every metric protocol that fits the task (binary: AVSBench, bias_in_AVS, Stepping Stones,
  SegPref; semantic: AVSS and the dataset-level confusion matrix);
- scores per subset (v1s / v1m / v2) and per class (semantic runs: the protocol's per-class IoU;
  binary runs: the mean clip IoU of the clips whose sounding objects, ``a_obj``, include the class);
- frames with ground truth (green outline) and prediction (red) overlaid, for the best and the
  worst clips and the clips whose score changes most when the audio is muted; for those, the same
  frames predicted with real and with muted audio side by side;
- histograms from the caches: AudioSet tags (clip-level, p >= 0.4) of the beats output and
  k-means unit use of the units output, for the manifest's clips.

Clip scores for choosing the clips: per annotated frame the IoU of the predicted sounding pixels
(argmax over classes, non-background) with the ground truth's, 1 when both are empty; averaged
over the clip's frames.
"""

from __future__ import annotations

import html
import json
import os

import click
import numpy as np
import torch

import soundstage.train.assemble as assemble
from soundstage.device import resolve_device
from soundstage.manifests.palette import AVSBENCH_CLASSES, index_to_colour
from soundstage.manifests.table import frame_path
from soundstage.metrics import Accumulator
from soundstage.models.avs_mask2former import class_scores
from soundstage.train.data import collate_frames, frame_clip_ids
from soundstage.train.evaluation import DEFAULT_PROTOCOL, model_inputs
from soundstage.train.run_eval import load_run, run_model

VARIANTS = ("real", "muted", "zeroed", "swapped", "noise:10")
PROTOCOLS = {
    "binary": ("avsbench-binary", "bias-in-avs", "stepping-stones", "segpref"),
    "semantic": ("avsbench-semantic", "cavp-dataset"),
}
EPS = 1e-6
TAG_THRESHOLD = 0.4
SHOWN_CLIPS = 3  # clips per picture grid
SHOWN_FRAMES = 5  # frames per clip in a grid


class ReportError(ValueError):
    pass


# ---------------------------------------------------------------------------- scoring


def clip_iou(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over frames of the IoU of non-background pixels (1 when both are empty)."""
    scores = []
    for p, g in zip(pred != 0, labels != 0):
        union = np.logical_or(p, g).sum()
        scores.append(1.0 if union == 0 else float(np.logical_and(p, g).sum() / union))
    return float(np.mean(scores))


class Scorer:
    """Runs the model over a dataset once and feeds every protocol, per subset and per clip."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg, self.device = model, cfg, device
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
            out = self.model(**model_inputs(batch, self.device))
            labels = batch["labels"]
            scores = class_scores(out, tuple(labels.shape[-2:])).clamp_min(EPS).log().cpu()
            clip_ids = frame_clip_ids(batch)
            yield clip_ids, batch["frames"], scores, labels

    def score(self, data, subsets: dict) -> dict:
        """{protocol: result}, {subset: primary protocol result}, {clip_id: clip IoU}."""
        task = self.cfg.task
        options = {"pred_kind": "logits"}
        if task == "semantic":
            options["num_classes"] = self.model.config.num_labels
        overall = {p: Accumulator(p, **options) for p in PROTOCOLS[task]}
        primary = self.cfg.protocol or DEFAULT_PROTOCOL[task]
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
        return ({n: a.compute() for n, a in overall.items()}, {s: a.compute() for s, a in per_subset.items()}, clips)

    def _pred(self, scores: torch.Tensor, protocol: str) -> torch.Tensor:
        if self.cfg.task == "semantic" or protocol == "stepping-stones":
            return scores
        return scores[:, 1] - scores[:, 0]


# ---------------------------------------------------------------------------- pictures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return os.path.basename(path)


def overlay(image: np.ndarray, pred: np.ndarray, labels: np.ndarray | None, semantic: bool) -> np.ndarray:
    """The frame with the prediction filled (red; class colours for semantic runs) and the
    ground truth's outline in green."""
    out = image.astype(np.float32)
    fill = index_to_colour(pred).astype(np.float32) if semantic else np.array([230.0, 30, 30])
    region = (pred != 0)[..., None]
    out = np.where(region, 0.55 * out + 0.45 * fill, out)
    if labels is not None:
        g = labels != 0
        edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
        out[edge] = (40, 230, 40)
    return out.clip(0, 255).astype(np.uint8)


def frame_image(row: dict, frame: int, manifest_dir: str, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(frame_path(row, frame, manifest_dir)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def grid(path: str, panels: list[list[tuple[np.ndarray, str]]], row_titles: list[str]) -> str:
    """A grid of images: one row per clip (titled), one titled panel per column."""
    plt = _plt()
    rows, cols = len(panels), max(len(p) for p in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c][0])
                ax.set_title(row[c][1], fontsize=7)
        axes[r][0].text(
            -0.08, 0.5, row_titles[r], transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=7
        )
    fig.tight_layout()
    return _save(fig, path)


def bars(path: str, names: list[str], values: list[float], title: str, xlabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(names) + 1.2))
    ax.barh(range(len(names))[::-1], values)
    ax.set_yticks(range(len(names))[::-1], names, fontsize=7)
    ax.set(title=title, xlabel=xlabel)
    fig.tight_layout()
    return _save(fig, path)


def curve_pictures(run, out_dir: str) -> list[str]:
    plt = _plt()
    steps, epochs = run.records("steps.jsonl"), run.records("epochs.jsonl")
    if not steps and not epochs:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.9)
    axes[0].set(title="training loss", xlabel="step")
    variants = sorted({v for r in epochs for v in r.get("eval", {})}, key=lambda v: (v != "real", v))
    for variant in variants:
        points = [(r["epoch"], r["eval"][variant]) for r in epochs if variant in r.get("eval", {})]
        for ax, key in ((axes[1], "miou"), (axes[2], "fscore")):
            ax.plot([e for e, _ in points], [v.get(key) for _, v in points], marker="o", label=variant)
    for ax, key in ((axes[1], "mIoU"), (axes[2], "F-score")):
        ax.set(title=f"{key} by audio ({epochs[-1].get('split', '') if epochs else ''})", xlabel="epoch")
        if variants:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return [_save(fig, os.path.join(out_dir, "curves.png"))]


# ---------------------------------------------------------------------------- caches


def tag_histogram(cache: str, clip_ids: list[str], selector, out_dir: str) -> tuple[str | None, str]:
    """(picture, note) of the clip-level AudioSet tags of the beats output in ``cache``."""
    from soundstage.models.audioset_tags import TagNamer, class_mids_of_output, tag_counts

    sd, reader, present, note = _cached_clips(cache, "beats", "clip_probs", selector, clip_ids)
    if not present:
        return None, note
    counts, tagged = tag_counts(reader, present, TagNamer(class_mids_of_output(sd)), TAG_THRESHOLD)
    top = counts.most_common(25)
    if not top:
        return None, f"{note}: no clip has a tag with p >= {TAG_THRESHOLD}"
    picture = bars(
        os.path.join(out_dir, "tags.png"),
        [n for n, _ in top],
        [c for _, c in top],
        f"AudioSet tags (p >= {TAG_THRESHOLD}) of {len(present)} clips ({tagged} tagged)",
        "clips",
    )
    return picture, note


def cluster_histogram(cache: str, clip_ids: list[str], selector, out_dir: str) -> tuple[str | None, str]:
    """(picture, note) of the share of audio frames (50 Hz) that fall in each k-means unit."""
    _, reader, present, note = _cached_clips(cache, "units", "frame_hist", selector, clip_ids)
    if not present:
        return None, note
    use = sum(np.asarray(reader[c]["frame_hist"], np.float64).sum(0) for c in present)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.bar(np.arange(len(use)), use / max(use.sum(), 1e-12))
    ax.set(title=f"k-means unit use over {len(present)} clips (K = {len(use)})", xlabel="unit", ylabel="share of frames")
    fig.tight_layout()
    return _save(fig, os.path.join(out_dir, "clusters.png")), note


def _cached_clips(cache: str, stage: str, field: str, selector, clip_ids: list[str]):
    """(StageDir, reader, the clips of ``clip_ids`` it holds, a note naming it or why there is none)."""
    from soundstage.cache import open_stage
    from soundstage.pipeline.registry import get_stage
    from soundstage.pipeline.resolve import UpstreamError, choose

    if not cache or not os.path.isdir(os.path.join(cache, stage)):
        return None, None, [], f"no {stage} output in {cache}"
    try:
        sd = choose(cache, get_stage(stage), selector, log=lambda *_: None)
    except UpstreamError as e:
        return None, None, [], str(e).strip()
    reader = open_stage(sd.path, fields=[field])
    present = [c for c in clip_ids if c in reader]
    note = f"{stage} output {os.path.basename(sd.path)}"
    return sd, reader, present, note if present else f"{note} holds none of the manifest's clips"


# ---------------------------------------------------------------------------- the page


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str | None, alt: str, note: str = "") -> str:
    if not name:
        return f"<p class=note>{html.escape(note or 'not available')}</p>"
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"><figcaption>{html.escape(note)}</figcaption></figure>'
    )


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#777}figure{margin:0 0 1.5em}figcaption{color:#555;font-size:.85em}"""


def write_report(
    run_path: str,
    out_dir: str,
    split: str | None = None,
    cache: str | None = None,
    device: str = "auto",
    beats: str | None = None,
    units: str | None = None,
    log=print,
) -> str:
    """Write ``out_dir/index.html`` and its pictures; returns the page's path."""
    from soundstage.cache.table import read_manifest

    run, cfg, recorded = load_run(run_path)
    split = split or cfg.eval_split
    cache = cache or cfg.cache
    os.makedirs(out_dir, exist_ok=True)
    device = resolve_device(device)
    cues = assemble.open_cues(cfg, recorded=recorded, log=lambda *_: None)
    model, weights = run_model(run, cfg, cues)
    model.to(device).eval()
    num_queries = model.config.num_queries
    real = assemble.dataset(cfg, cues, split, num_queries=num_queries)
    rows = {r["clip_id"]: r for r in real.rows}
    subsets = {cid: str(r.get("subset", "")) for cid, r in rows.items()}
    semantic = cfg.task == "semantic"
    scorer = Scorer(model, cfg, device)

    # every audio variant the run has a cue for
    variants = VARIANTS if "audio" in cues else ("real",)
    datasets, results, per_subset, clips = {}, {}, {}, {}
    for variant in variants:
        silence = assemble.silence_for(run, cues, assemble.max_frames(real), device) if variant == "muted" else None
        datasets[variant] = assemble.dataset(cfg, cues, split, variant, silence=silence, num_queries=num_queries)
        results[variant], per_subset[variant], clips[variant] = scorer.score(datasets[variant], subsets)
        log(f"report: scored {split} with {variant} audio")
    primary = cfg.protocol or DEFAULT_PROTOCOL[cfg.task]

    # which clips to show
    ranked = sorted(clips["real"], key=lambda c: (clips["real"][c], c))
    chosen = {"best": ranked[::-1][:SHOWN_CLIPS], "worst": ranked[:SHOWN_CLIPS]}
    if "muted" in clips:
        change = {c: clips["real"][c] - clips["muted"][c] for c in ranked}
        chosen["audio-sensitive"] = sorted(change, key=lambda c: (-abs(change[c]), c))[:SHOWN_CLIPS]
    pictures = {}
    index = {cid: i for i, cid in enumerate(real.clip_ids)}
    manifest_dir = real.manifest_dir
    for title, picked in chosen.items():
        pictures[title] = _clip_grid(
            scorer,
            datasets["real"],
            [index[c] for c in picked],
            rows,
            manifest_dir,
            semantic,
            clips["real"],
            os.path.join(out_dir, f"{title}.png"),
        )
    if "muted" in datasets:
        pictures["real-vs-muted"] = _real_vs_muted(
            scorer,
            datasets,
            [index[c] for c in chosen["audio-sensitive"]],
            rows,
            manifest_dir,
            semantic,
            clips,
            os.path.join(out_dir, "real-vs-muted.png"),
        )

    manifest_ids = read_manifest(cfg.manifest)["clip_id"].tolist()
    tags_png, tags_note = tag_histogram(cache, manifest_ids, beats, out_dir)
    clusters_png, clusters_note = cluster_histogram(cache, manifest_ids, units, out_dir)
    curves = curve_pictures(run, out_dir)

    sections = [
        f"<h1>soundstage run report: {html.escape(os.path.basename(run.path))}</h1>",
        _run_summary(run, cfg, recorded, weights, split, len(real)),
    ]
    sections.append(
        "<h2>Curves</h2>"
        + (
            _img(curves[0], "curves", "loss per step; metrics per evaluation and audio variant (metrics/*.jsonl)")
            if curves
            else "<p class=note>no metrics recorded yet</p>"
        )
    )
    header = ["audio"] + [f"{p} {k}" for p in PROTOCOLS[cfg.task] for k in ("mIoU", "F")]
    table = [[v] + [results[v][p].get(k) for p in PROTOCOLS[cfg.task] for k in ("miou", "fscore")] for v in variants]
    if "muted" in results:
        table.append(
            ["real − muted"]
            + [results["real"][p].get(k) - results["muted"][p].get(k) for p in PROTOCOLS[cfg.task] for k in ("miou", "fscore")]
        )
    sections.append(
        f"<h2>Audio sensitivity ({html.escape(split)}, {len(real)} clips)</h2>"
        "<p>The same clips with the audio cue real, muted (digital silence through the cue's own model), "
        "zeroed, swapped with another clip's, and noised at 10 dB SNR.</p>" + _table(header, table)
    )
    sub_header = ["subset", "clips"] + [f"{v} mIoU" for v in variants] + ["real F"]
    sub_rows = [
        [s, sum(1 for c in subsets.values() if c == s)]
        + [per_subset[v][s].get("miou") for v in variants]
        + [per_subset["real"][s].get("fscore")]
        for s in sorted(per_subset["real"])
    ]
    sections.append(f"<h2>Per subset ({html.escape(primary)})</h2>" + _table(sub_header, sub_rows))
    sections.append("<h2>Per class</h2>" + _per_class(results["real"], clips, rows, semantic, variants, scorer.gt_classes))
    for title in chosen:
        sections.append(
            f"<h2>{html.escape(title.capitalize())} clips</h2>"
            + _img(pictures[title], title, "ground truth outlined in green, prediction in red (real audio); title: clip IoU")
        )
    if "real-vs-muted" in pictures:
        sections.append(
            "<h2>Real vs muted audio</h2>"
            + _img(
                pictures["real-vs-muted"],
                "real vs muted",
                "the most audio-sensitive clips: each frame predicted with the real audio, then muted",
            )
        )
    sections.append(
        "<h2>From the caches</h2>" + _img(tags_png, "tags", tags_note) + _img(clusters_png, "clusters", clusters_note)
    )
    page = os.path.join(out_dir, "index.html")
    text = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(os.path.basename(run.path))} — "
        f"soundstage report</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    with open(page + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(page + ".tmp", page)
    with open(os.path.join(out_dir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"split": split, "protocols": results, "per_subset": per_subset, "clip_iou": clips, "shown": chosen},
            f,
            indent=1,
            default=float,
        )
    return page


def _run_summary(run, cfg, recorded: dict, weights: str, split: str, clips: int) -> str:
    steps = run.records("steps.jsonl")
    rows = [
        ["task", cfg.task],
        ["model", cfg.model or "tiny stand-in (soundstage/data/tiny/mask2former.json)"],
        ["audio cue", cfg.audio or "none"],
        ["conditioning", cfg.conditioning],
        ["steps done", steps[-1]["step"] if steps else 0],
        ["finished", "yes" if run.done else "no"],
        ["weights", weights],
        ["report split", f"{split} ({clips} clips)"],
    ]
    rows += [[f"{role} cache", f"{entry['stage']} {entry['fingerprint']}"] for role, entry in sorted(recorded.items())]
    return _table(["run", html.escape(run.path)], rows)


def _per_class(result: dict, clips: dict, rows: dict, semantic: bool, variants, gt_classes: set) -> str:
    if semantic:
        per_class = result["avsbench-semantic"].get("per_class_iou", [])
        shown = [
            (AVSBENCH_CLASSES[i] if i < len(AVSBENCH_CLASSES) else str(i), v)
            for i, v in enumerate(per_class)
            if v > 0 or i in gt_classes
        ]
        return (
            "<p>avsbench-semantic per-class IoU of the classes in the ground truth or scored (the mean over "
            "all classes counts the others as 0).</p>" + _table(["class", "IoU"], sorted(shown, key=lambda x: -x[1]))
        )
    members: dict[str, list] = {}
    for cid, row in rows.items():
        for name in filter(None, str(row.get("a_obj", "")).split("_")):
            members.setdefault(name, []).append(cid)
    table = [
        [name, len(ids)] + [float(np.mean([clips[v][c] for c in ids])) for v in variants] for name, ids in sorted(members.items())
    ]
    return "<p>Mean clip IoU of the clips in which the class sounds (manifest <code>a_obj</code>).</p>" + _table(
        ["class", "clips"] + [f"{v} IoU" for v in variants], table
    )


def _predicted(scorer: Scorer, data, indices) -> dict:
    """clip_id -> {frame: (argmax class map, labels)} of the clips at ``indices``."""
    out: dict = {}
    for clip_ids, frames, scores, labels in scorer.outputs(data, indices):
        argmax = scores.argmax(1).numpy()
        for i, cid in enumerate(clip_ids):
            out.setdefault(cid, {})[int(frames[i])] = (argmax[i], labels[i].numpy())
    return out


def _clip_grid(scorer, data, indices, rows, manifest_dir, semantic, scores, path) -> str | None:
    if not indices:
        return None
    predicted = _predicted(scorer, data, indices)
    panels, titles = [], []
    for cid, frames in predicted.items():
        shown = sorted(frames)[:SHOWN_FRAMES]
        size = frames[shown[0]][0].shape[0]
        panels.append(
            [
                (overlay(frame_image(rows[cid], f, manifest_dir, size), frames[f][0], frames[f][1], semantic), f"frame {f}")
                for f in shown
            ]
        )
        titles.append(f"{cid}\nIoU {scores[cid]:.3f}")
    return grid(path, panels, titles)


def _real_vs_muted(scorer, datasets, indices, rows, manifest_dir, semantic, clips, path) -> str | None:
    if not indices:
        return None
    real, muted = _predicted(scorer, datasets["real"], indices), _predicted(scorer, datasets["muted"], indices)
    panels, titles = [], []
    for cid in real:
        row = []
        for f in sorted(real[cid])[:3]:
            size = real[cid][f][0].shape[0]
            image = frame_image(rows[cid], f, manifest_dir, size)
            row.append((overlay(image, real[cid][f][0], real[cid][f][1], semantic), f"frame {f} real"))
            row.append((overlay(image, muted[cid][f][0], muted[cid][f][1], semantic), f"frame {f} muted"))
        panels.append(row)
        titles.append(f"{cid}\nIoU {clips['real'][cid]:.3f} / {clips['muted'][cid]:.3f}")
    return grid(path, panels, titles)


@click.command("report")
@click.option(
    "--run", "run_path", required=True, type=click.Path(exists=True, file_okay=False), help="training run directory (runs/NAME)"
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="folder for index.html and its pictures (files of the same names are replaced)",
)
@click.option("--split", help="split to score and show (default: the run's evaluation split)")
@click.option("--cache", help="cache root for the tag and cluster histograms (default: the run's)")
@click.option("--beats", help="which beats output for the tag histogram: FINGERPRINT or key=value,...")
@click.option("--units", help="which units output for the cluster histogram: FINGERPRINT or key=value,...")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
def report(run_path, out_dir, split, cache, beats, units, device):
    """A static HTML page about a training run: curves, audio sensitivity, per-subset and per-class
    scores, best / worst / audio-sensitive frames, real vs muted, tag and cluster histograms."""
    from soundstage.cache.reader import MissingClip
    from soundstage.train.config import ConfigError
    from soundstage.train.cues import CueError

    try:
        page = write_report(
            run_path,
            out_dir,
            split=split,
            cache=cache,
            device=device,
            beats=beats,
            units=units,
            log=lambda m: click.echo(m, err=True),
        )
    except (ConfigError, CueError, MissingClip, ReportError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {page}")
