"""``soundstage report --run runs/NAME --out report/``: one static HTML page about a training run
(with several ``--run``, the page comparing them: ``soundstage.train.compare``).

``report/index.html`` and the PNG files beside it (no server, no script, no network): open it in
any browser. What is on it:

- the run: settings, the cache outputs it read, how far it got, which weights are shown (the
  run's best model when it keeps one, with its ``best.json``; else its final or last weights);
- curves: training loss per step, and per evaluation the metrics under every audio variant
  (from ``metrics/*.jsonl``);
- audio sensitivity: the split (``--split``, default the run's evaluation split) scored now with
  the real audio cue and with it muted (the cue of digital silence through the same audio model),
  zeroed, swapped (another clip's) and noised, under every metric protocol that fits the task
  (binary: AVSBench, bias_in_AVS, Stepping Stones, SegPref; semantic: AVSS and the dataset-level
  confusion matrix);
- scores per subset (v1s / v1m / v2) and per class (semantic runs: the protocol's per-class IoU;
  binary runs: the mean clip IoU of the clips whose sounding objects, ``a_obj``, include the class);
- clips, each labelled (clip id, subset, sounding classes, clip IoU) with its frames, prediction
  and ground truth overlaid and a spectrogram strip of its audio under them
  (``soundstage.train.report_parts``): the best clips, the worst, and the clips whose score
  changes most when the audio is muted — three disjoint sets — the last predicted with real and
  with muted audio;
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

from soundstage.cache import open_stage
from soundstage.cache.reader import MissingClip
from soundstage.cache.table import read_manifest
from soundstage.manifests.palette import AVSBENCH_CLASSES
from soundstage.models.audioset_tags import TagNamer, class_mids_of_output, tag_counts
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import UpstreamError, choose
from soundstage.train.compare import write_comparison
from soundstage.train.config import ConfigError
from soundstage.train.cues import CueError
from soundstage.train.report_parts import (
    LEGEND,
    PROTOCOLS,
    ScoredRun,
    clip_block,
    clip_label,
    figure,
    prediction_strip,
    primary_protocol,
    pyplot,
    save_figure,
    score_run,
    shown_frames,
    spectrogram_strip,
    table,
    weights_note,
    write_page,
)

TAG_THRESHOLD = 0.4
SHOWN_CLIPS = 3  # clips per section
CLIPS_DIR = "clips"  # the clip strips, beside index.html


class ReportError(ValueError):
    pass


# ---------------------------------------------------------------------------- pictures


def bars(path: str, names: list[str], values: list[float], title: str, xlabel: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(names) + 1.2))
    ax.barh(range(len(names))[::-1], values)
    ax.set_yticks(range(len(names))[::-1], names, fontsize=7)
    ax.set(title=title, xlabel=xlabel)
    fig.tight_layout()
    return save_figure(fig, path)


def curve_pictures(run, out_dir: str) -> list[str]:
    plt = pyplot()
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
    return [save_figure(fig, os.path.join(out_dir, "curves.png"))]


# ---------------------------------------------------------------------------- caches


def tag_histogram(cache: str, clip_ids: list[str], selector, out_dir: str) -> tuple[str | None, str]:
    """(picture, note) of the clip-level AudioSet tags of the beats output in ``cache``."""
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.bar(np.arange(len(use)), use / max(use.sum(), 1e-12))
    ax.set(title=f"k-means unit use over {len(present)} clips (K = {len(use)})", xlabel="unit", ylabel="share of frames")
    fig.tight_layout()
    return save_figure(fig, os.path.join(out_dir, "clusters.png")), note


def _cached_clips(cache: str, stage: str, field: str, selector, clip_ids: list[str]):
    """(StageDir, reader, the clips of ``clip_ids`` it holds, a note naming it or why there is none)."""
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


# ---------------------------------------------------------------------------- clips


def choose_clips(clips: dict) -> dict[str, list[str]]:
    """Best, worst and (with a muted score) audio-sensitive clips: ``SHOWN_CLIPS`` each, no clip
    in two sections (the sensitive ones are those whose clip IoU changes most when muted)."""
    ranked = sorted(clips["real"], key=lambda c: (clips["real"][c], c))
    best = ranked[::-1][:SHOWN_CLIPS]
    worst = [c for c in ranked if c not in best][:SHOWN_CLIPS]
    chosen = {"best": best, "worst": worst}
    if "muted" in clips:
        change = {c: clips["real"][c] - clips["muted"][c] for c in ranked if c not in best and c not in worst}
        chosen["audio-sensitive"] = sorted(change, key=lambda c: (-abs(change[c]), c))[:SHOWN_CLIPS]
    return chosen


def clip_section(scored: ScoredRun, section: str, clip_ids: list[str], out_dir: str) -> str:
    """The labelled clips of one section: frames predicted with the real audio (and, in the
    audio-sensitive section, with muted audio), the spectrogram strip under them."""
    if not clip_ids:
        return "<p class=note>no clip left for this section (the split is small)</p>"
    os.makedirs(os.path.join(out_dir, CLIPS_DIR), exist_ok=True)
    index = {cid: i for i, cid in enumerate(scored.real.clip_ids)}
    rows, manifest_dir = scored.rows, scored.real.manifest_dir
    semantic = scored.cfg.task == "semantic"
    variants = ["real", "muted"] if section == "audio-sensitive" else ["real"]
    predicted = {v: scored.scorer.predicted(scored.datasets[v], [index[c] for c in clip_ids]) for v in variants}
    blocks = []
    for n, cid in enumerate(clip_ids, 1):
        frames = shown_frames(predicted["real"][cid])
        name = f"{CLIPS_DIR}/{section}-{n}"
        strips = [
            (
                f"{v} audio",
                f"{CLIPS_DIR}/"
                + prediction_strip(
                    predicted[v][cid], frames, rows[cid], manifest_dir, semantic, os.path.join(out_dir, f"{name}-{v}.png")
                ),
            )
            for v in variants
        ]
        spectrogram = spectrogram_strip(rows[cid], frames, manifest_dir, os.path.join(out_dir, f"{name}-audio.png"))
        label = clip_label(cid, rows[cid], {v: scored.clips[v][cid] for v in variants})
        blocks.append(clip_block(label, strips, spectrogram and f"{CLIPS_DIR}/{spectrogram}", frames, out_dir))
    return "".join(blocks)


# ---------------------------------------------------------------------------- the page


def write_report(
    run_path: str,
    out_dir: str,
    split: str | None = None,
    cache: str | None = None,
    device: str = "auto",
    beats: str | None = None,
    units: str | None = None,
    log=print,
    weights: str | None = None,
) -> str:
    """Write ``out_dir/index.html`` and its pictures; returns the page's path. ``weights``: best |
    last (None: best when the run keeps one)."""
    scored = score_run(run_path, split, device, log=log, weights=weights)
    cfg, run, split = scored.cfg, scored.run, scored.split
    cache = cache or cfg.cache
    os.makedirs(out_dir, exist_ok=True)
    results, per_subset, clips = scored.results, scored.per_subset, scored.clips
    variants = list(results)
    chosen = choose_clips(clips)

    manifest_ids = read_manifest(cfg.manifest)["clip_id"].tolist()
    tags_png, tags_note = tag_histogram(cache, manifest_ids, beats, out_dir)
    clusters_png, clusters_note = cluster_histogram(cache, manifest_ids, units, out_dir)
    curves = curve_pictures(run, out_dir)

    sections = [f"<h1>soundstage run report: {html.escape(scored.name)}</h1>", _run_summary(scored)]
    sections.append(
        "<h2>Curves</h2>"
        + (
            figure(curves[0], "curves", "loss per step; metrics per evaluation and audio variant (metrics/*.jsonl)")
            if curves
            else "<p class=note>no metrics recorded yet</p>"
        )
    )
    protocols = PROTOCOLS[cfg.task]
    header = ["audio"] + [f"{p} {k}" for p in protocols for k in ("mIoU", "F")]
    rows = [[v] + [results[v][p].get(k) for p in protocols for k in ("miou", "fscore")] for v in variants]
    for other in ("muted", "swapped"):
        if other in results:
            rows.append(
                [f"real − {other}"]
                + [results["real"][p].get(k) - results[other][p].get(k) for p in protocols for k in ("miou", "fscore")]
            )
    sections.append(
        f"<h2>Audio sensitivity ({html.escape(split)}, {len(scored.real)} clips)</h2>"
        "<p>The same clips with the audio cue real, muted (digital silence through the cue's own model), "
        "zeroed, swapped with another clip's, and noised at 10 dB SNR.</p>" + table(header, rows)
    )
    subsets = {cid: str(r.get("subset", "")) for cid, r in scored.rows.items()}
    sub_header = ["subset", "clips"] + [f"{v} mIoU" for v in variants] + ["real F"]
    sub_rows = [
        [s, sum(1 for c in subsets.values() if c == s)]
        + [per_subset[v][s].get("miou") for v in variants]
        + [per_subset["real"][s].get("fscore")]
        for s in sorted(per_subset["real"])
    ]
    sections.append(f"<h2>Per subset ({html.escape(primary_protocol(cfg))})</h2>" + table(sub_header, sub_rows))
    sections.append(
        "<h2>Per class</h2>"
        + _per_class(results["real"], clips, scored.rows, cfg.task == "semantic", variants, scored.scorer.gt_classes)
    )
    titles = {
        "best": "Best clips",
        "worst": "Worst clips",
        "audio-sensitive": "Audio-sensitive clips (real vs muted audio)",
    }
    for section, picked in chosen.items():
        sections.append(f"<h2>{titles[section]}</h2>" + LEGEND + clip_section(scored, section, picked, out_dir))
    sections.append(
        "<h2>From the caches</h2>" + figure(tags_png, "tags", tags_note) + figure(clusters_png, "clusters", clusters_note)
    )
    page = write_page(out_dir, f"{scored.name} — soundstage report", sections)
    with open(os.path.join(out_dir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "split": split,
                "weights": scored.weights,
                "protocols": results,
                "per_subset": per_subset,
                "clip_iou": clips,
                "shown": chosen,
            },
            f,
            indent=1,
            default=float,
        )
    return page


def _run_summary(scored: ScoredRun) -> str:
    run, cfg = scored.run, scored.cfg
    steps = run.records("steps.jsonl")
    rows = [
        ["task", cfg.task],
        ["recipe", cfg.recipe],
        ["model", cfg.model or "tiny stand-in (soundstage/data/tiny/mask2former.json)"],
        ["audio cue", cfg.audio or "none"],
        ["conditioning", cfg.conditioning],
        ["steps done", steps[-1]["step"] if steps else 0],
        ["finished", "yes" if run.done else "no"],
        ["weights", weights_note(scored)],
        ["report split", f"{scored.split} ({len(scored.real)} clips)"],
    ]
    rows += [[f"{role} cache", f"{entry['stage']} {entry['fingerprint']}"] for role, entry in sorted(scored.recorded.items())]
    return table(["run", run.path], rows)


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
            "all classes counts the others as 0).</p>" + table(["class", "IoU"], sorted(shown, key=lambda x: -x[1]))
        )
    members: dict[str, list] = {}
    for cid, row in rows.items():
        for name in filter(None, str(row.get("a_obj", "")).split("_")):
            members.setdefault(name, []).append(cid)
    by_class = [
        [name, len(ids)] + [float(np.mean([clips[v][c] for c in ids])) for v in variants] for name, ids in sorted(members.items())
    ]
    return "<p>Mean clip IoU of the clips in which the class sounds (manifest <code>a_obj</code>).</p>" + table(
        ["class", "clips"] + [f"{v} IoU" for v in variants], by_class
    )


@click.command("report")
@click.option(
    "--run",
    "run_paths",
    required=True,
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="training run directory (runs/NAME); several: one page comparing them",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="folder for index.html and its pictures (files of the same names are replaced)",
)
@click.option("--split", help="split to score and show, e.g. test (default: the (first) run's evaluation split)")
@click.option("--cache", help="cache root for the tag and cluster histograms (default: the run's; one run only)")
@click.option("--beats", help="which beats output for the tag histogram: FINGERPRINT or key=value,... (one run only)")
@click.option("--units", help="which units output for the cluster histogram: FINGERPRINT or key=value,... (one run only)")
@click.option(
    "--weights",
    type=click.Choice(["best", "last"]),
    help="the run's best model (model/best) or its last weights (default: best when the run keeps one)",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
def report(run_paths, out_dir, split, cache, beats, units, weights, device):
    """A static HTML page about a training run: curves, audio sensitivity, per-subset and per-class
    scores, best / worst / audio-sensitive clips with their spectrograms, tag and cluster histograms.

    With several --run: one page comparing them (settings that differ, curves overlaid, every
    protocol, audio sensitivity per run, the same clips' frames from each run side by side)."""
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if len(run_paths) == 1:
            page = write_report(
                run_paths[0], out_dir, split=split, cache=cache, device=device, beats=beats, units=units, log=log, weights=weights
            )
        else:
            given = [name for name, value in (("--cache", cache), ("--beats", beats), ("--units", units)) if value]
            if given:
                raise click.UsageError(f"{', '.join(given)}: only for the page of one run (the comparison has no histograms)")
            page = write_comparison(list(run_paths), out_dir, split=split, device=device, log=log, weights=weights)
    except (ConfigError, CueError, MissingClip, ReportError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {page}")
