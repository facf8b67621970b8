"""``soundstage report --run A --run B [...] --out DIR``: one static page comparing training runs.

``write_comparison([run dirs], out_dir)`` is the same page from Python (e.g. every recipe of a
demo side by side). On it:

- the runs: name, recipe, task, audio cue, steps, finished, weights shown, and every setting
  whose value differs between them (settings equal in all runs are counted, not listed);
- curves overlaid, one colour per run: training loss per step; per evaluation the real-audio
  mIoU (solid) and muted-audio mIoU (dashed); real − muted and real − swapped mIoU;
- metrics with the real audio under every protocol of the runs' tasks (a protocol that does not
  fit a run's task is left empty);
- audio sensitivity per run: mIoU of the primary protocol under every audio variant, real − muted
  and real − swapped;
- the same clips from each run side by side: the clips of the split that every run scored,
  those on which the runs disagree most (largest spread of clip IoU); per clip one strip of the
  same frames per run (prediction and ground truth overlaid) and the spectrogram strip under them.

Every run is scored now on the same split (``split``, default the first run's evaluation split),
with the weights ``soundstage.train.report_parts.score_run`` loads.
"""

from __future__ import annotations

import html
import json
import os

import soundstage.train.report_parts as parts

SHOWN_CLIPS = 4
CLIPS_DIR = "clips"
IGNORED_SETTINGS = ("out",)  # always different, and said by the run names


def run_names(paths: list[str]) -> list[str]:
    """Short unique names: the folder name, or as many trailing path parts as make them unique."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i + 1}: {p}" for i, p in enumerate(paths)]


def settings_diff(configs: list[dict]) -> tuple[list[str], int]:
    """(settings whose values differ between the runs, how many are the same in all)."""
    keys = sorted({k for c in configs for k in c} - set(IGNORED_SETTINGS))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    return differ, len(keys) - len(differ)


def curves_overlaid(runs: list[parts.ScoredRun], names: list[str], path: str) -> str | None:
    records = [(r.run.records("steps.jsonl"), r.run.records("epochs.jsonl")) for r in runs]
    if not any(steps or epochs for steps, epochs in records):
        return None
    plt = parts.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((steps, epochs), name) in enumerate(zip(records, names)):
        colour = colours[i % len(colours)]
        axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, color=colour, label=name)
        for variant, style in (("real", "-"), ("muted", "--")):
            points = [(r["epoch"], r["eval"][variant].get("miou")) for r in epochs if variant in r.get("eval", {})]
            if points:
                axes[1].plot(*zip(*points), style, marker="o", ms=3, color=colour, label=f"{name} {variant}")
        for other, style in (("muted", "-"), ("swapped", ":")):
            points = [
                (r["epoch"], r["eval"]["real"].get("miou") - r["eval"][other].get("miou"))
                for r in epochs
                if "real" in r.get("eval", {}) and other in r["eval"]
            ]
            if points:
                axes[2].plot(*zip(*points), style, marker="o", ms=3, color=colour, label=f"{name} real − {other}")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="evaluation mIoU (solid: real audio, dashed: muted)", xlabel="epoch")
    axes[2].set(title="real − muted (solid), real − swapped (dotted) mIoU", xlabel="epoch")
    axes[2].axhline(0, color="#999", lw=0.6)
    for ax in axes:
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=6)
    fig.tight_layout()
    return parts.save_figure(fig, path)


def disputed_clips(runs: list[parts.ScoredRun]) -> list[str]:
    """The clips every run scored, those whose clip IoU differs most between the runs first."""
    common = [c for c in runs[0].real.clip_ids if all(c in r.clips["real"] for r in runs[1:])]
    spread = {c: max(r.clips["real"][c] for r in runs) - min(r.clips["real"][c] for r in runs) for c in common}
    return sorted(common, key=lambda c: (-spread[c], c))[:SHOWN_CLIPS]


def side_by_side(runs: list[parts.ScoredRun], names: list[str], clip_ids: list[str], out_dir: str) -> str:
    if not clip_ids:
        return "<p class=note>the runs scored no clip in common</p>"
    os.makedirs(os.path.join(out_dir, CLIPS_DIR), exist_ok=True)
    predicted = []
    for r in runs:
        index = {cid: i for i, cid in enumerate(r.real.clip_ids)}
        predicted.append(r.scorer.predicted(r.real, [index[c] for c in clip_ids]))
    first = runs[0]
    blocks = []
    for n, cid in enumerate(clip_ids, 1):
        frames = parts.shown_frames(predicted[0][cid])
        frames = [f for f in frames if all(f in p[cid] for p in predicted)]
        name = f"{CLIPS_DIR}/compare-{n}"
        strips = []
        for k, (r, run_name) in enumerate(zip(runs, names)):
            picture = parts.prediction_strip(
                predicted[k][cid],
                frames,
                r.rows[cid],
                r.real.manifest_dir,
                r.cfg.task == "semantic",
                os.path.join(out_dir, f"{name}-run{k + 1}.png"),
            )
            strips.append((run_name, f"{CLIPS_DIR}/{picture}"))
        spectrogram = parts.spectrogram_strip(
            first.rows[cid], frames, first.real.manifest_dir, os.path.join(out_dir, f"{name}-audio.png")
        )
        label = parts.clip_label(cid, first.rows[cid], {run_name: r.clips["real"][cid] for r, run_name in zip(runs, names)})
        blocks.append(parts.clip_block(label, strips, spectrogram and f"{CLIPS_DIR}/{spectrogram}", frames, out_dir))
    return "".join(blocks)


def write_comparison(
    run_paths: list[str], out_dir: str, split: str | None = None, device: str = "auto", log=print, weights: str | None = None
) -> str:
    """Write ``out_dir/index.html`` comparing the runs (see the module docstring); returns its path.
    ``weights``: best | last for every run (None: each run's best when it keeps one)."""
    if len(run_paths) < 2:
        raise ValueError("a comparison needs at least two runs")
    first = parts.score_run(run_paths[0], split, device, log=log, weights=weights)
    runs = [first] + [parts.score_run(p, first.split, device, log=log, weights=weights) for p in run_paths[1:]]
    names = run_names(run_paths)
    os.makedirs(out_dir, exist_ok=True)
    configs = [r.cfg.to_dict() for r in runs]
    differ, same = settings_diff(configs)

    sections = [f"<h1>soundstage run comparison: {html.escape(', '.join(names))}</h1>"]
    overview = [
        [
            name,
            r.cfg.recipe,
            r.cfg.task,
            r.cfg.audio or "none",
            (r.run.records("steps.jsonl") or [{"step": 0}])[-1]["step"],
            "yes" if r.run.done else "no",
            parts.weights_note(r),
        ]
        for name, r in zip(names, runs)
    ]
    sections.append(
        "<h2>Runs</h2>" + parts.table(["run", "recipe", "task", "audio cue", "steps", "finished", "weights"], overview)
    )
    diff_rows = [[key] + [json.dumps(c.get(key)) for c in configs] for key in differ]
    sections.append(
        "<h2>Settings that differ</h2>"
        + (parts.table(["setting"] + names, diff_rows) if diff_rows else "<p>none</p>")
        + f"<p class=note>{same} other settings are the same in every run (config.json).</p>"
    )
    curves = curves_overlaid(runs, names, os.path.join(out_dir, "curves.png"))
    sections.append(
        "<h2>Curves</h2>"
        + parts.figure(
            curves,
            "curves overlaid",
            "one colour per run (metrics/*.jsonl)",
        )
        if curves
        else "<h2>Curves</h2><p class=note>no metrics recorded yet</p>"
    )
    protocols = [p for task in dict.fromkeys(r.cfg.task for r in runs) for p in parts.PROTOCOLS[task]]
    metric_rows = [
        [name] + [r.results["real"].get(p, {}).get(k) for p in protocols for k in ("miou", "fscore")]
        for name, r in zip(names, runs)
    ]
    sections.append(
        f"<h2>Metrics ({html.escape(first.split)}, real audio)</h2>"
        + parts.table(["run"] + [f"{p} {k}" for p in protocols for k in ("mIoU", "F")], metric_rows)
    )
    variants = [v for v in parts.VARIANTS if any(v in r.results for r in runs)]
    sensitivity = [
        [name, parts.primary_protocol(r.cfg)]
        + [r.results[v][parts.primary_protocol(r.cfg)].get("miou") if v in r.results else None for v in variants]
        + [r.gap("muted"), r.gap("swapped")]
        for name, r in zip(names, runs)
    ]
    sections.append(
        f"<h2>Audio sensitivity ({html.escape(first.split)})</h2>"
        "<p>mIoU with the audio cue real, muted (digital silence through the cue's own model), zeroed, swapped "
        "with another clip's and noised at 10 dB SNR; a model that listens loses accuracy without its audio.</p>"
        + parts.table(["run", "protocol"] + [f"{v} mIoU" for v in variants] + ["real − muted", "real − swapped"], sensitivity)
    )
    shown = disputed_clips(runs)
    sections.append(
        "<h2>The same clips from each run</h2>"
        "<p>The clips whose score differs most between the runs; each row is one run's prediction (real audio) "
        "on the same frames.</p>" + parts.LEGEND + side_by_side(runs, names, shown, out_dir)
    )
    page = parts.write_page(out_dir, "soundstage run comparison", sections)
    with open(os.path.join(out_dir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "split": first.split,
                "runs": {
                    name: {"path": r.run.path, "weights": r.weights, "protocols": r.results} for name, r in zip(names, runs)
                },
                "settings_differ": differ,
                "shown": shown,
            },
            f,
            indent=1,
            default=float,
        )
    return page
