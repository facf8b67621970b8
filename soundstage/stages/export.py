"""``soundstage export``: cached stage outputs written in the files the original methods read.

``segpref-json``: the text cues of "Can Textual Semantics Mitigate Sounding Object Segmentation
Preference?" (SegPref, ECCV 2024): ``{"<vid>": {"f0": "guitar,man,None,None,", ...}}``,
comma-terminated source names per frame from the ``sources`` stage, cut or padded with "None"
to ``--n-slots`` (SegPref's own loader pads the same way, so padded and unpadded files read alike).

``vggish-npy``: ``OUT/<uid>.npy`` float32 ``[T, 128]`` per clip, ``--layout per-subset``
``OUT/{v1s,v1m,v2}_vggish_embs/<uid>.npy`` (the folders GAVS and bias_in_AVS ``np.load`` from), or
the AVSBench-object folder layout (``--layout avsbench-object``).

``log-mel``: AVSBench-object's per-clip pickles of the VGGish log-mel examples, a float32 tensor
``[5, 1, 96, 64]``, ``OUT/<split>/<category>/<uid>.pkl`` (S4) and ``OUT/<split>/<uid>.pkl`` (MS3).

``m2f-bundles``: bias_in_AVS's ``AVS_m2f_processed/<ver>/<uid>.pth`` (image-processor outputs from
the ``frames`` stage, VGGish rows, masks, image sizes, uid).

``km`` and ``kmeans-model``: fairseq's HuBERT layout (``SPLIT.km``, ``SPLIT.ids``, ``SPLIT.tsv``,
``dict.km.txt``) and the k-means as ``learn_kmeans.py``'s joblib ``MiniBatchKMeans``.

``active-queries``: ``OUT/<uid>.pth`` per clip, a list of T lists of query ids (what bias_in_AVS
loads with ``torch.load`` and iterates per frame), plus ``OUT/mapping.json`` (the mapping, threshold
and cluster rule they were made with). ``query-mapping`` writes the default mapping the
``active-queries`` stage takes.

``segpref-text``: ``OUT/<uid>/<i>.np`` per frame (``np.save`` to a file named ``.np``, which
``np.load`` reads), float32 ``[4, 1024]``: the ``textcues`` output made with ``--slots segpref``
(ImageBind's embeddings of SegPref's four slot texts), SegPref's ``feat_text_dir``.

``masks``: ``OUT/<label>/<uid>/<i>.png`` per frame (label = v1s / v1m / v2), single channel,
0/255, ``--size`` square, foreground where the cached probability > ``--threshold`` — the
stage-1 masks Stepping Stones' stage 2 reads, here for every split.

Every per-clip export takes ``--config PIPELINE.yaml`` or ``--manifest``/``--cache``, refuses a
non-empty ``--out`` without ``--overwrite`` and names the manifest clips that have no record.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import click
import joblib
import numpy as np
import soundfile as sf
import torch
from PIL import Image

from soundstage.audio import TARGET_SR, load_audio
from soundstage.cache import open_stage
from soundstage.cache.reader import read_result
from soundstage.cache.store import atomic_write_text
from soundstage.cache.table import read_manifest
from soundstage.manifests.avsbench import FRAMES_PER_SUBSET, SUBSETS
from soundstage.manifests.table import ManifestError, resolve_path
from soundstage.models.kmeans import sklearn_kmeans
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import UpstreamError, choose, expected_fingerprint
from soundstage.pipeline.stage import ClipError
from soundstage.stages.active_queries import MappingError, default_mapping, frame_lists, mapping_json, parse_mapping, tag_ranking
from soundstage.stages.masks import binary_masks, released_path
from soundstage.stages.textcues import frame_names, segpref_frame_text
from soundstage.stages.units import export_km
from soundstage.stages.vggish import clip_examples, fit_rows
from soundstage.train.cues import CueError
from soundstage.train.data import load_label, normalized


@click.group()
def export():
    """Write cached outputs in the formats of the original research code."""


def config_option(what: str):
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), help=f"pipeline YAML: {what}")


def manifest_option(what: str):
    return click.option("--manifest", type=click.Path(exists=True, dir_okay=False), envvar="SOUNDSTAGE_MANIFEST", help=what)


#: the cache root of an export (the engine's ``CACHE_OPTION`` has no pipeline file to fall back on)
cache_option = click.option("--cache", envvar="SOUNDSTAGE_CACHE", help="cache root (default: the pipeline's, else ./cache)")


def segpref_texts(manifest_rows: list, reader, n_slots: int, names: str, key: str) -> tuple[dict, dict]:
    """(json object, report) for the clips of ``manifest_rows`` found in the ``sources`` ``reader``."""
    out, owner = {}, {}
    report = {"clips": 0, "frames": 0, "frames_without_answer": 0, "missing": [], "conflicts": [], "sharing": {}}
    for row in manifest_rows:
        cid = row["clip_id"]
        if cid not in reader:
            report["missing"].append(cid)
            continue
        record = reader[cid]
        frames = {f"f{i}": segpref_frame_text(n, n_slots) for i, n in enumerate(frame_names(record, names))}
        k = row[key]
        if k in out:  # SegPref keys by vid, which several v2 clips share: the first clip's cues stay
            if out[k] != frames:
                report["conflicts"].append((k, owner[k], cid))
                continue
            report["sharing"].setdefault(k, [owner[k]]).append(cid)
        else:
            out[k], owner[k] = frames, cid
        report["clips"] += 1
        report["frames"] += len(frames)
        report["frames_without_answer"] += sum(s != "ok" for s in record["status"])
    return out, report


@export.command("segpref-json")
@config_option("its manifest, cache and the sources output its parameters give")
@manifest_option("clips to export and their vid (default with --config: the pipeline's)")
@cache_option
@click.option("--sources", "selector", help="which sources output: FINGERPRINT or key=value,... (default: the only one)")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="JSON file to write")
@click.option("--n-slots", default=4, show_default=True, help="cut/pad each frame to this many names with None (0: no padding)")
@click.option(
    "--names",
    type=click.Choice(["raw", "vocab"]),
    default="raw",
    show_default=True,
    help="the LLM's names, or their mapping onto the dataset classes (sources --vocabulary)",
)
@click.option(
    "--key",
    type=click.Choice(["vid", "clip_id"]),
    default="vid",
    show_default=True,
    help="vid: as SegPref's loader looks texts up; clip_id: unique per clip",
)
@click.option("--allow-missing", is_flag=True, help="leave out clips without a sources record instead of failing")
def segpref_json(config, manifest, cache, selector, out_path, n_slots, names, key, allow_missing):
    """SegPref text-cue JSON from the sources stage: {"<vid>": {"f0": "guitar,man,None,None,", ...}}."""
    rows, stage_dir = chosen_output("sources", config, manifest, cache, selector)
    if key not in rows[0]:
        raise click.ClickException(f"the manifest has no column {key!r} (use --key clip_id)")
    try:
        texts, report = segpref_texts(rows, open_stage(stage_dir.path), n_slots, names, key)
    except ClipError as e:
        raise click.ClickException(str(e)) from None

    problems = [f"{k}: clips {a} and {b} share it with different texts" for k, a, b in report["conflicts"]]
    if report["missing"] and not allow_missing:
        problems.append(
            f"{len(report['missing'])} clip(s) have no sources record, e.g. {report['missing'][:5]}"
            " (run sources on them, or --allow-missing)"
        )
    if problems:
        hint = "; use --key clip_id for a loader that looks texts up by clip" if report["conflicts"] else ""
        raise click.ClickException("not written:\n  " + "\n  ".join(problems[:20]) + hint)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_text(out_path, json.dumps(texts, ensure_ascii=False))
    click.echo(
        f"wrote {out_path}: {len(texts)} keys for {report['clips']} clips, {report['frames']} frames "
        f"({report['frames_without_answer']} without a usable answer: written as no sources)"
        + (f"; left out {len(report['missing'])} clips without a sources record" if report["missing"] else "")
    )
    if report["sharing"]:
        click.echo(shared_keys_note(report["sharing"], key))


def shared_keys_note(sharing: dict, key: str, shown: int = 5) -> str:
    """Which keys several clips share (with identical cues) and whose cues the key holds."""
    lines = [
        f"{sum(map(len, sharing.values()))} clips share {len(sharing)} {key}(s), each with identical cues; "
        "the key holds the first clip's (manifest order):"
    ]
    for k, clips in list(sharing.items())[:shown]:
        lines.append(f"  {k}: {len(clips)} clips, kept {clips[0]} (same as {', '.join(clips[1:])})")
    if len(sharing) > shown:
        lines.append(f"  ... and {len(sharing) - shown} more")
    return "\n".join(lines)


# ------------------------------------------------------------------ exports of per-clip arrays
#
# Each reads one output of a stage, picked like a stage picks its upstream (``--config
# PIPELINE.yaml``: the output that pipeline's parameters give; else ``--<stage> SELECTOR`` or the
# only one in ``--cache``), writes one file per manifest clip, refuses a non-empty ``--out``
# unless ``--overwrite``, and names every manifest clip without a record (with the cause the stage
# recorded) instead of skipping it.


def output_options(stage_name: str):
    """--config / --manifest / --cache / --<stage> selector / --out / --overwrite / --allow-missing."""

    def decorate(command):
        for option in reversed(
            [
                config_option("its manifest, cache and the exact output its parameters give"),
                manifest_option("clips to export (default with --config: the pipeline's)"),
                cache_option,
                click.option(f"--{stage_name}", "selector", help=f"which {stage_name} output: FINGERPRINT or key=value,..."),
                click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder to write"),
                click.option("--overwrite", is_flag=True, help="write into a non-empty --out, replacing files of the same names"),
                click.option("--allow-missing", is_flag=True, help="write the clips that have a record; still name the others"),
            ]
        ):
            command = option(command)
        return command

    return decorate


def pipeline_inputs(config, manifest, cache, need_manifest: bool = True):
    """(manifest, cache, Pipeline or None): the options, else what the pipeline file names."""
    pipe = load_pipeline(config) if config else None
    if pipe:
        manifest, cache = manifest or pipe.manifest, cache or pipe.cache
    if need_manifest and not manifest:
        raise click.UsageError("give --manifest (or --config with a manifest)")
    return manifest, cache, pipe


def chosen_stage_dir(stage_name: str, cache, selector, pipe=None):
    """The output of ``stage_name`` a selector, else the pipeline's parameters, else the only one picks."""
    if pipe and selector is None and stage_name in pipe.stages:
        selector = expected_fingerprint(stage_name, pipe.stages)
    try:
        return choose(cache or "cache", get_stage(stage_name), selector, log=lambda m: click.echo(m, err=True))
    except UpstreamError as e:
        raise click.ClickException(str(e)) from None


def chosen_output(stage_name: str, config, manifest, cache, selector):
    """(manifest rows, StageDir) the export options pick."""
    manifest, cache, pipe = pipeline_inputs(config, manifest, cache)
    return read_manifest(manifest).to_dict("records"), chosen_stage_dir(stage_name, cache, selector, pipe)


def clips_to_write(rows: list, reader, stage_dir, allow_missing: bool) -> tuple[list, list]:
    """(rows with a record, lines naming the manifest clips without one and why)."""
    failures = stage_dir.failures()
    missing = [row["clip_id"] for row in rows if row["clip_id"] not in reader]
    named = [f"{cid}: " + (failures[cid]["cause"] if cid in failures else "not computed") for cid in missing]
    if named and not allow_missing:
        more = f"\n  ... and {len(named) - 20} more" if len(named) > 20 else ""
        raise click.ClickException(
            f"not written: {len(named)} clip(s) have no record in {stage_dir.path} "
            "(compute them, or --allow-missing):\n  " + "\n  ".join(named[:20]) + more
        )
    return [row for row in rows if row["clip_id"] in reader], named


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise click.ClickException(f"{out_dir} is not empty; choose another --out or pass --overwrite")
    os.makedirs(out_dir, exist_ok=True)


def report_written(count: int, out_dir: str, named: list) -> None:
    click.echo(f"wrote {count} clips to {out_dir}")
    if named:
        click.echo(f"left out {len(named)} clip(s) without a record:\n  " + "\n  ".join(named), err=True)


def _replace_with(path: str, write) -> None:
    """``write(tmp_path)`` then rename: a killed export never leaves a half-written file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _replace_folder(path: str, write) -> None:
    """``write(tmp_folder)`` then rename the folder whole: a killed export leaves no partial clip
    folder (Stepping Stones counts every file in one), only a hidden ``.<name>.partial`` beside it,
    which the next export of that clip removes."""
    parent, name = os.path.split(path)
    tmp, old = os.path.join(parent, f".{name}.partial"), os.path.join(parent, f".{name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.isdir(path):  # --overwrite: swap, then drop the old folder
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def _save_npy(path: str, array) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array)


def avsbench_object_path(row: dict) -> str:
    """Where AVSBench-object keeps this clip's audio, as a relative path without extension:
    S4 (v1s) ``<split>/<category>/<uid>``, MS3 (v1m) ``<split>/<uid>``."""
    if row.get("subset") == "v1s":
        return os.path.join(row["split"], row["a_obj"].replace("-", "_"), row["clip_id"])
    if row.get("subset") == "v1m":
        return os.path.join(row["split"], row["clip_id"])
    raise click.ClickException(
        f"clip {row['clip_id']} (subset {row.get('subset')!r}) has no place in the "
        "AVSBench-object layout (only v1s/S4 and v1m/MS3); use --layout flat"
    )


def per_subset_path(row: dict) -> str:
    """``<subset>_vggish_embs/<uid>`` — the folders GAVS and bias_in_AVS read
    (``f"{feat_path}/{ver}_vggish_embs/{uid}.npy"`` with ver = v1s / v1m / v2)."""
    if row.get("subset") not in SUBSETS:
        raise click.ClickException(
            f"clip {row['clip_id']}: subset {row.get('subset')!r} is not one of {', '.join(SUBSETS)}, "
            "so it has no <subset>_vggish_embs folder; use --layout flat"
        )
    return os.path.join(f"{row['subset']}_vggish_embs", row["clip_id"])


VGGISH_LAYOUTS = {"flat": lambda row: row["clip_id"], "per-subset": per_subset_path, "avsbench-object": avsbench_object_path}


@export.command("vggish-npy")
@output_options("vggish")
@click.option(
    "--layout",
    type=click.Choice(list(VGGISH_LAYOUTS)),
    default="flat",
    show_default=True,
    help="flat: OUT/<uid>.npy; per-subset: OUT/{v1s,v1m,v2}_vggish_embs/<uid>.npy (GAVS, bias_in_AVS); "
    "avsbench-object: OUT/<split>/<category>/<uid>.npy (S4) and OUT/<split>/<uid>.npy (MS3), as "
    "AVSBench-object lays out audio_wav/",
)
def vggish_npy(config, manifest, cache, selector, out_dir, overwrite, allow_missing, layout):
    """VGGish embeddings as one float32 [T, 128] .npy per clip."""
    rows, stage_dir = chosen_output("vggish", config, manifest, cache, selector)
    reader = open_stage(stage_dir.path, fields=["embeddings"])
    present, named = clips_to_write(rows, reader, stage_dir, allow_missing)
    places = {row["clip_id"]: VGGISH_LAYOUTS[layout](row) for row in present}
    prepare_out_dir(out_dir, overwrite)
    for row in present:
        embeddings = np.asarray(reader[row["clip_id"]]["embeddings"], np.float32)
        _replace_with(os.path.join(out_dir, places[row["clip_id"]] + ".npy"), lambda tmp, e=embeddings: _save_npy(tmp, e))
    report_written(len(present), out_dir, named)


def manifest_options(what: str):
    """--config / --manifest / --out / --overwrite of an export computed from the manifest's files."""

    def decorate(command):
        for option in reversed(
            [
                config_option("its manifest"),
                manifest_option(f"clips to export (default with --config: the pipeline's); {what}"),
                click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder to write"),
                click.option("--overwrite", is_flag=True, help="write into a non-empty --out, replacing files of the same names"),
            ]
        ):
            command = option(command)
        return command

    return decorate


def _save_pickle(path: str, value) -> None:
    with open(path, "wb") as f:
        pickle.dump(value, f)


@export.command("log-mel")
@manifest_options("computed from their audio files")
def log_mel(config, manifest, out_dir, overwrite):
    """AVSBench-object's log-mel pickles: OUT/<split>/<category>/<uid>.pkl (S4), OUT/<split>/<uid>.pkl (MS3).

    Each holds a float32 torch tensor [5, 1, 96, 64]: the VGGish front end of the vggish stage, cut
    to 5 examples or padded by repeating the last (AVSBench's preprocessing). v2 clips, which that
    code never reads, are skipped and counted."""
    manifest, _, _ = pipeline_inputs(config, manifest, None)
    rows = read_manifest(manifest).to_dict("records")
    manifest_dir = os.path.dirname(os.path.abspath(manifest))
    kept = [row for row in rows if row.get("subset") in ("v1s", "v1m")]
    places = {row["clip_id"]: avsbench_object_path(row) for row in kept}
    prepare_out_dir(out_dir, overwrite)
    failed = []
    for row in kept:
        try:
            found = clip_examples(resolve_path(row["audio_path"], manifest_dir))
        except ClipError as e:
            failed.append(f"{row['clip_id']}: {e}")
            continue
        examples = torch.from_numpy(fit_rows(found, FRAMES_PER_SUBSET[row["subset"]], "repeat-last"))[:, None]
        _replace_with(os.path.join(out_dir, places[row["clip_id"]] + ".pkl"), lambda tmp, x=examples: _save_pickle(tmp, x))
    skipped = len(rows) - len(kept)
    click.echo(
        f"wrote {len(kept) - len(failed)} clips to {out_dir}"
        + (f"; skipped {skipped} clip(s) outside S4/MS3 (v2: AVSBench-object has no log-mel for them)" if skipped else "")
    )
    if failed:
        raise click.ClickException(f"{len(failed)} clip(s) not written:\n  " + "\n  ".join(failed))


# ------------------------------------------------------------------ bias_in_AVS processed bundles

BUNDLE_FRAMES = 5  # bias_in_AVS's loader reads 5 images per clip (FN = 5), every subset
BUNDLE_MASK_SIZE = 256
BIAS_IN_AVS_INPUT = 384  # AVS/models/avs_m2f.py: pixel_values.view(bsz, 3, 384, 384)


def m2f_bundle(row: dict, frames: dict, embeddings: np.ndarray, manifest_dir: str) -> tuple:
    """bias_in_AVS's ``AVS_m2f_processed/{ver}/{uid}.pth``: ``(img_recs, feat_aud, mask_recs,
    image_sizes, uid)`` — 5 image-processor outputs ``{"pixel_values": [1, 3, S, S], "pixel_mask":
    [1, S, S]}``, the VGGish rows ``[T, 128]`` (T = 5, or 10 for v2; the last repeated if short),
    5 binary masks ``[256, 256]`` float32 and ``[(height, width)]`` of the last image read. v1s
    train clips repeat frame 0 (the only labelled one) five times, as their loader does."""
    repeat_first = row["subset"] == "v1s" and row["split"] == "train"
    chosen = [0] * BUNDLE_FRAMES if repeat_first else list(range(BUNDLE_FRAMES))
    pixels, size = frames["pixels"], frames["pixels"].shape[1]
    images = [
        {
            "pixel_values": torch.from_numpy(normalized(pixels[f]))[None],
            "pixel_mask": torch.ones((1, size, size), dtype=torch.int64),
        }
        for f in chosen
    ]
    rows = FRAMES_PER_SUBSET.get(row["subset"], BUNDLE_FRAMES)
    audio = torch.from_numpy(fit_rows(np.asarray(embeddings, np.float32), rows, "repeat-last"))
    masks = [
        torch.from_numpy((load_label(row, f, manifest_dir, BUNDLE_MASK_SIZE, "binary") != 0).astype(np.float32)) for f in chosen
    ]
    height, width = (int(v) for v in frames["source_size"][chosen[-1]])
    return images, audio, masks, [(height, width)], row["clip_id"]


@export.command("m2f-bundles")
@output_options("frames")
@click.option("--vggish", "vggish_selector", help="which vggish output: FINGERPRINT or key=value,... (their feat_aud)")
def m2f_bundles(config, manifest, cache, selector, out_dir, overwrite, allow_missing, vggish_selector):
    """bias_in_AVS's processed bundles: OUT/<ver>/<uid>.pth, what its AVS dataset torch.loads per clip.

    Images from the frames stage (Mask2Former's resize, rescale and normalise; their model views
    pixel_values as 384 x 384: use the frames output of size 384), audio from the vggish stage, masks
    from the manifest's labels."""
    rows, frames_dir = chosen_output("frames", config, manifest, cache, selector)
    manifest, cache, pipe = pipeline_inputs(config, manifest, cache)
    vggish_dir = chosen_stage_dir("vggish", cache, vggish_selector, pipe)
    frames, audio = open_stage(frames_dir.path), open_stage(vggish_dir.path, fields=["embeddings"])
    present, named = clips_to_write(rows, frames, frames_dir, allow_missing)
    present, named_audio = clips_to_write(present, audio, vggish_dir, allow_missing)
    prepare_out_dir(out_dir, overwrite)
    manifest_dir, failed = os.path.dirname(os.path.abspath(manifest)), []
    for row in present:
        try:
            bundle = m2f_bundle(row, frames[row["clip_id"]], audio[row["clip_id"]]["embeddings"], manifest_dir)
        except (ManifestError, OSError, CueError) as e:
            failed.append(f"{row['clip_id']}: {e}")
            continue
        path = os.path.join(out_dir, row["subset"], row["clip_id"] + ".pth")
        _replace_with(path, lambda tmp, b=bundle: torch.save(b, tmp))
    report_written(len(present) - len(failed), out_dir, named + named_audio)
    size = frames_dir.meta()["params"]["size"]
    if size != BIAS_IN_AVS_INPUT:
        click.echo(f"note: images are {size} x {size}; bias_in_AVS's model views pixel_values as 384 x 384", err=True)
    if failed:
        raise click.ClickException(f"{len(failed)} clip(s) not written:\n  " + "\n  ".join(failed))


# ------------------------------------------------------------------ fairseq HuBERT layout


@export.command("km")
@config_option("its manifest, cache and units output")
@manifest_option(
    "export this manifest's clips, in its order, with the .tsv of their audio (default: every cached clip, sorted, no .tsv)"
)
@cache_option
@click.option("--units", "selector", help="which units output: FINGERPRINT or key=value,... (default: the only one)")
@click.option("--out", "km_path", required=True, type=click.Path(dir_okay=False), help="SPLIT.km file to write")
@click.option("--ids", "ids_path", type=click.Path(dir_okay=False), help="clip id list (default: --out with .ids)")
def km(config, manifest, cache, selector, km_path, ids_path):
    """fairseq's HuBERT label layout: SPLIT.km (unit ids per clip), SPLIT.ids, dict.km.txt and SPLIT.tsv.

    SPLIT.tsv lists the clips' 16 kHz audio in the same order (first line the root folder, then
    relative path TAB samples), as HuBERT's dataset reads it; audio at another rate is written once
    as the 16 kHz mono float wav the hubert stage computed on, under SPLIT_audio16k/."""
    manifest, cache, pipe = pipeline_inputs(config, manifest, cache, need_manifest=False)
    for option, path in (("--out", km_path), ("--ids", ids_path)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise click.ClickException(f"{option} {path}: folder {folder} does not exist")
    stage_dir = chosen_stage_dir("units", cache, selector, pipe)
    rows = read_manifest(manifest).to_dict("records") if manifest else None
    try:
        ids, counts = export_km(stage_dir.path, km_path, ids_path, [r["clip_id"] for r in rows] if rows else None)
    except (KeyError, ValueError, OSError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    folder, split = os.path.split(os.path.splitext(os.path.abspath(km_path))[0])
    dict_path = os.path.join(folder, "dict.km.txt")  # fairseq Dictionary: "<symbol> <count>" per line
    atomic_write_text(dict_path, "".join(f"{unit} {count}\n" for unit, count in enumerate(counts.tolist())))
    click.echo(f"wrote {len(ids)} clips to {km_path} and {len(counts)} units to {dict_path}")
    if rows is None:
        click.echo("no .tsv written: give --manifest (or --config) for the audio of the clips", err=True)
        return
    tsv_path, copied = write_hubert_tsv(rows, os.path.dirname(os.path.abspath(manifest)), folder, split)
    click.echo(f"wrote {tsv_path}" + (f" ({copied} clip(s) resampled to 16 kHz into {split}_audio16k/)" if copied else ""))


def write_hubert_tsv(rows: list, manifest_dir: str, folder: str, split: str) -> tuple[str, int]:
    """``folder/split.tsv`` for ``rows`` (and 16 kHz copies of other-rate audio); (path, copies)."""
    listed, copied = [], 0
    for row in rows:
        path = os.path.abspath(resolve_path(row["audio_path"], manifest_dir))
        try:
            info = sf.info(path)
        except (RuntimeError, OSError) as e:
            raise click.ClickException(f"clip {row['clip_id']}: cannot read audio {path} ({e})") from None
        if info.samplerate != TARGET_SR:  # HuBERT's dataset refuses any other rate
            path = os.path.join(folder, f"{split}_audio16k", f"{row['clip_id']}.wav")
            wave = load_audio(resolve_path(row["audio_path"], manifest_dir)).wave
            _replace_with(path, lambda tmp, w=wave: sf.write(tmp, w, TARGET_SR, subtype="FLOAT", format="WAV"))
            copied += 1
        listed.append((path, sf.info(path).frames))
    root = os.path.commonpath([os.path.dirname(p) for p, _ in listed])
    tsv_path = os.path.join(folder, f"{split}.tsv")
    atomic_write_text(tsv_path, root + "\n" + "".join(f"{os.path.relpath(p, root)}\t{n}\n" for p, n in listed))
    return tsv_path, copied


@export.command("kmeans-model")
@config_option("its cache and kmeans output")
@cache_option
@click.option("--kmeans", "selector", help="which kmeans output: FINGERPRINT or key=value,... (default: the only one)")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="joblib file to write (e.g. km500.bin)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
def kmeans_model(config, cache, selector, out_path, overwrite):
    """The fitted k-means as fairseq's learn_kmeans.py saves it: a joblib-pickled sklearn MiniBatchKMeans.

    Its cluster_centers_ are our centroids in float64, so dump_km_label.py's ApplyKmeans computes
    the distances in float64 as the units stage did and gives the cached units exactly."""
    _, cache, pipe = pipeline_inputs(config, None, cache, need_manifest=False)
    if os.path.exists(out_path) and not overwrite:
        raise click.ClickException(f"{out_path} exists; choose another --out or pass --overwrite")
    stage_dir = chosen_stage_dir("kmeans", cache, selector, pipe)
    result = read_result(stage_dir.path)
    model = sklearn_kmeans(result["centroids"], stage_dir.meta()["params"].get("seed", 0))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    _replace_with(out_path, lambda tmp: joblib.dump(model, tmp))
    click.echo(f"wrote {out_path}: {len(result['centroids'])} centroids of dim {result['centroids'].shape[1]}")


@export.command("active-queries")
@output_options("active-queries")
def active_queries(config, manifest, cache, selector, out_dir, overwrite, allow_missing):
    """bias_in_AVS active queries: OUT/<uid>.pth (a list of T lists of query ids) and OUT/mapping.json."""
    rows, stage_dir = chosen_output("active-queries", config, manifest, cache, selector)
    reader = open_stage(stage_dir.path)
    present, named = clips_to_write(rows, reader, stage_dir, allow_missing)
    prepare_out_dir(out_dir, overwrite)
    meta, single = stage_dir.meta(), 0
    for row in present:
        lists = frame_lists(reader[row["clip_id"]])
        single += sum(len(ids) == 1 for ids in lists)
        _replace_with(os.path.join(out_dir, row["clip_id"] + ".pth"), lambda tmp, v=lists: torch.save(v, tmp))
    record = {
        "_threshold": meta["params"]["threshold"],
        "_clusters": meta["params"]["clusters"],
        "_active_queries_output": meta["fingerprint"],
        **mapping_json(parse_mapping(meta["metadata"]["mapping"])),
    }
    atomic_write_text(os.path.join(out_dir, "mapping.json"), json.dumps(record, indent=1) + "\n")
    report_written(len(present), out_dir, named)
    if single:
        click.echo(
            f"note: {single} frame(s) have exactly one query id; bias_in_AVS's trainer activates only "
            "query 0 for a list of length 1",
            err=True,
        )


@export.command("masks")
@output_options("masks")
@click.option(
    "--size",
    default=224,
    show_default=True,
    type=click.IntRange(min=1),
    help="side of the square PNGs (the cached maps are resized when theirs differs)",
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="foreground where p > threshold (0.5: p(sounding) > p(background), as Stepping Stones)",
)
@click.option("--split", "splits", multiple=True, help="only the clips of this split (repeatable; default: every split)")
def masks(config, manifest, cache, selector, out_dir, overwrite, allow_missing, size, threshold, splits):
    """Stepping-stone masks as Stepping Stones' stage 2 reads them: OUT/<label>/<uid>/<i>.png, 0/255."""
    rows, stage_dir = chosen_output("masks", config, manifest, cache, selector)
    if splits:
        rows = [row for row in rows if row.get("split") in splits]
        if not rows:
            raise click.ClickException(f"the manifest has no clip of split {', '.join(splits)}")
    reader = open_stage(stage_dir.path, fields=["probs"])
    present, named = clips_to_write(rows, reader, stage_dir, allow_missing)
    prepare_out_dir(out_dir, overwrite)
    for row in present:
        masks = binary_masks(reader[row["clip_id"]]["probs"], size, threshold)

        def write(folder, masks=masks):
            for i, mask in enumerate(masks):
                Image.fromarray(mask, mode="L").save(os.path.join(folder, f"{i}.png"), format="PNG")

        _replace_folder(os.path.dirname(released_path(out_dir, row, 0)), write)
    report_written(len(present), out_dir, named)


@export.command("segpref-text")
@output_options("textcues")
def segpref_text(config, manifest, cache, selector, out_dir, overwrite, allow_missing):
    """SegPref's text features: OUT/<uid>/<i>.np, one float32 [slots, dim] array per frame."""
    rows, stage_dir = chosen_output("textcues", config, manifest, cache, selector)
    if stage_dir.meta()["params"].get("slots", "masked") != "segpref":
        raise click.ClickException(
            f"the textcues output {os.path.basename(stage_dir.path)} has masked slots (zeros where no source was found); "
            "SegPref embeds the word None there: run textcues with --slots segpref (and --encoder imagebind_huge.pth)"
        )
    reader = open_stage(stage_dir.path, fields=["cues"])
    present, named = clips_to_write(rows, reader, stage_dir, allow_missing)
    prepare_out_dir(out_dir, overwrite)
    frames = 0
    for row in present:
        cues = np.asarray(reader[row["clip_id"]]["cues"], np.float32)

        def write(folder, cues=cues):
            for i, frame in enumerate(cues):
                with open(os.path.join(folder, f"{i}.np"), "wb") as f:  # a file object: np.save would add .npy
                    np.save(f, frame)

        _replace_folder(os.path.join(out_dir, row["clip_id"]), write)
        frames += len(cues)
    report_written(len(present), out_dir, named)
    if present:
        click.echo(f"{frames} frames of {cues.shape[1]} x {cues.shape[2]} (SegPref's feat_text_dir)")


@export.command("query-mapping")
@config_option("its manifest, cache and outputs")
@manifest_option("the clips whose tags are counted (with --split)")
@cache_option
@click.option("--units", "units_selector", help="which units output (its cluster count K)")
@click.option("--beats", "beats_selector", help="which beats output (its tags)")
@click.option("--split", default="train", show_default=True, help="count tags on the clips of this split")
@click.option("--threshold", default=0.4, show_default=True, help="a frame has a tag when its probability is at least this")
@click.option("--queries", default=100, show_default=True, help="Q: query ids are 0 .. Q-1")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="mapping JSON to write")
def query_mapping(config, manifest, cache, units_selector, beats_selector, split, threshold, queries, out_path):
    """The default active-queries mapping: clusters c -> c, then the most frequent tags of --split -> K, K+1, ..."""
    if os.path.exists(out_path):
        raise click.ClickException(f"{out_path} exists; the mapping keys the active-queries output, so it is not replaced")
    rows, units_dir = chosen_output("units", config, manifest, cache, units_selector)
    _, beats_dir = chosen_output("beats", config, manifest, cache, beats_selector)
    units, beats = open_stage(units_dir.path, fields=["frame_hist"]), open_stage(beats_dir.path, fields=["second_probs"])
    counted = [row["clip_id"] for row in rows if row.get("split") == split and row["clip_id"] in beats]
    if not counted or not len(units):
        raise click.ClickException(f"no {split} clip of the manifest has beats tags (or no units are cached)")
    num_clusters = units[next(iter(units))]["frame_hist"].shape[1]
    mids = tag_ranking((beats[cid]["second_probs"] for cid in counted), beats.meta["metadata"]["class_mids"], threshold)
    try:
        mapping = default_mapping(num_clusters, mids, queries)
    except MappingError as e:
        raise click.ClickException(str(e)) from None
    text = {
        "_comment": f"clusters c -> c (K = {num_clusters}); then the {len(mapping['classes'])} most frequent "
        f"tags (p >= {threshold:g}) of {len(counted)} {split} clips -> {num_clusters}, ...",
        **mapping_json(mapping),
    }
    atomic_write_text(out_path, json.dumps(text, indent=1) + "\n")
    click.echo(f"wrote {out_path}: {num_clusters} clusters and {len(mapping['classes'])} classes onto {queries} queries")
