"""``soundstage export``: cached stage outputs written in the files the original methods read.

``segpref-json``: the text cues of "Can Textual Semantics Mitigate Sounding Object Segmentation
Preference?" (SegPref, REFERENCE.md §3): ``{"<vid>": {"f0": "guitar,man,None,None,", ...}}``,
comma-terminated source names per frame from the ``sources`` stage, cut or padded with "None"
to ``--n-slots`` (SegPref's own loader pads the same way, so padded and unpadded files read alike).
"""

from __future__ import annotations

import json
import os

import click


@click.group()
def export():
    """Write cached outputs in the formats of the original research code."""


def segpref_frame_text(names: list, n_slots: int) -> str:
    """``guitar,man,None,None,`` — names cut to ``n_slots`` and padded with None (0: no padding)."""
    names = [n.replace(",", " ") for n in names]  # a comma would split one name into two
    if n_slots:
        names = names[:n_slots] + ["None"] * max(0, n_slots - len(names))
    return "".join(f"{n}," for n in names)


def segpref_texts(manifest_rows: list, reader, n_slots: int, names: str, key: str) -> tuple[dict, dict]:
    """(json object, report) for the clips of ``manifest_rows`` found in the ``sources`` ``reader``."""
    from soundstage.stages.textcues import frame_names

    out, owner = {}, {}
    report = {"clips": 0, "frames": 0, "frames_without_answer": 0, "missing": [], "conflicts": []}
    for row in manifest_rows:
        cid = row["clip_id"]
        if cid not in reader:
            report["missing"].append(cid)
            continue
        record = reader[cid]
        frames = {f"f{i}": segpref_frame_text(n, n_slots) for i, n in enumerate(frame_names(record, names))}
        k = row[key]
        if k in out and out[k] != frames:  # SegPref keys by vid, which several v2 clips share
            report["conflicts"].append((k, owner[k], cid))
            continue
        out[k], owner[k] = frames, cid
        report["clips"] += 1
        report["frames"] += len(frames)
        report["frames_without_answer"] += sum(s != "ok" for s in record["status"])
    return out, report


@export.command("segpref-json")
@click.option("--manifest", required=True, type=click.Path(exists=True, dir_okay=False), envvar="SOUNDSTAGE_MANIFEST",
              help="clips to export (and their vid)")
@click.option("--cache", default="cache", show_default=True, envvar="SOUNDSTAGE_CACHE", help="cache root")
@click.option("--sources", "selector", help="which sources output: FINGERPRINT or key=value,... (default: the only one)")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="JSON file to write")
@click.option("--n-slots", default=4, show_default=True, help="cut/pad each frame to this many names with None (0: no padding)")
@click.option("--names", type=click.Choice(["raw", "vocab"]), default="raw", show_default=True,
              help="the LLM's names, or their mapping onto the dataset classes (sources --vocabulary)")
@click.option("--key", type=click.Choice(["vid", "clip_id"]), default="vid", show_default=True,
              help="vid: as SegPref's loader looks texts up; clip_id: unique per clip")
@click.option("--allow-missing", is_flag=True, help="leave out clips without a sources record instead of failing")
def segpref_json(manifest, cache, selector, out_path, n_slots, names, key, allow_missing):
    """SegPref text-cue JSON from the sources stage: {"<vid>": {"f0": "guitar,man,None,None,", ...}}."""
    from soundstage.cache import open_stage
    from soundstage.cache.store import atomic_write_text
    from soundstage.manifests.table import read_manifest
    from soundstage.pipeline.resolve import UpstreamError, choose
    from soundstage.pipeline.stage import ClipError
    from soundstage.stages import get_stage

    try:
        stage_dir = choose(cache, get_stage("sources"), selector, log=lambda m: click.echo(m, err=True))
    except UpstreamError as e:
        raise click.ClickException(str(e)) from None
    rows = read_manifest(manifest).to_dict("records")
    if key not in rows[0]:
        raise click.ClickException(f"manifest {manifest} has no column {key!r}")
    try:
        texts, report = segpref_texts(rows, open_stage(stage_dir.path), n_slots, names, key)
    except ClipError as e:
        raise click.ClickException(str(e)) from None

    problems = [f"{k}: clips {a} and {b} share it with different texts" for k, a, b in report["conflicts"]]
    if report["missing"] and not allow_missing:
        problems.append(f"{len(report['missing'])} clip(s) have no sources record, e.g. {report['missing'][:5]}"
                        " (run sources on them, or --allow-missing)")
    if problems:
        hint = "; use --key clip_id for a loader that looks texts up by clip" if report["conflicts"] else ""
        raise click.ClickException("not written:\n  " + "\n  ".join(problems[:20]) + hint)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_text(out_path, json.dumps(texts, ensure_ascii=False))
    click.echo(f"wrote {out_path}: {report['clips']} clips, {report['frames']} frames "
               f"({report['frames_without_answer']} without a usable answer: written as no sources)"
               + (f"; left out {len(report['missing'])} clips without a sources record" if report["missing"] else ""))


def _add_exporters_of_other_stages() -> None:
    from soundstage.stages.units import km_command  # fairseq's .km format

    export.add_command(km_command)


_add_exporters_of_other_stages()
