"""Building a manifest from an AVSBench release, checking every file it references.

Two layouts are read:

- the unified release (AVSBench-semantic): ``ROOT/metadata.csv`` (vid,uid,s_min,s_sec,a_obj,split,
  label), ``ROOT/label2idx.json`` and ``ROOT/<label>/<uid>/`` with ``frames/{i}.jpg``,
  ``labels_rgb/{i}.png``, ``labels_semantic/{i}.png``, ``audio.wav`` (label = v1s / v1m / v2);
- the older AVSBench-object layout: ``[Single-source/]s4_meta_data.csv`` with ``s4_data/``
  (``visual_frames/{split}/{category}/{name}/{name}_{1..5}.png``, ``gt_masks/`` alike,
  ``audio_wav/{split}/{category}/{name}.wav``) and ``[Multi-sources/]ms3_meta_data.csv`` with
  ``ms3_data/`` (``visual_frames/{name}/{name}.mp4_{1..5}.png``,
  ``gt_masks/{split}/{name}/{name}_{1..5}.png``, ``audio_wav/{split}/{name}.wav``).
  S4 maps to subset v1s, MS3 to v1m.

Nothing is dropped: a clip with a missing or unreadable file, a duplicate uid or a bad metadata
row is a row with a ``problem``. Only a metadata file that cannot be read as a table at all
(not UTF-8, required column missing) stops the build, with a one-line ``MetadataError``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from soundstage.manifests.check import ClipCheck, FileCheck, check_clips
from soundstage.manifests.palette import NUM_CLASSES

FRAMES_PER_SUBSET = {"v1s": 5, "v1m": 5, "v2": 10}
SUBSETS = tuple(FRAMES_PER_SUBSET)
SPLITS = ("train", "val", "test")
UNIFIED_COLUMNS = ("vid", "uid", "s_min", "s_sec", "a_obj", "split", "label")

#: Column order of the written manifest (see ``soundstage.manifests.table`` for their meaning).
MANIFEST_COLUMNS = (
    "clip_id",
    "vid",
    "subset",
    "split",
    "audio_path",
    "frames_dir",
    "num_frames",
    "frame_pattern",
    "labels_rgb_dir",
    "labels_semantic_dir",
    "labels_binary_dir",
    "label_pattern",
    "annotated_frames",
    "a_obj",
    "problem",
    "s_min",
    "s_sec",
    "start_time",
    "audio_sample_rate",
    "audio_channels",
    "audio_seconds",
    "label2idx_path",
    "source_layout",
    "metadata_row",
)


METADATA_FILES = {"unified": "metadata.csv", "object-s4": "s4_meta_data.csv", "object-ms3": "ms3_meta_data.csv"}


class MetadataError(ValueError):
    """A metadata file that cannot be read as a table; the message is one line naming file and row."""


@dataclass
class BuildResult:
    manifest: pd.DataFrame
    layout: str  # "unified" or "object"
    warnings: list[str] = field(default_factory=list)  # dataset-level notes (e.g. no label2idx.json)


@dataclass
class _Clip:
    """A manifest row in the making and the files that decide its ``problem``."""

    row: dict
    check: ClipCheck


# ---------------------------------------------------------------- reading metadata tables


def read_metadata(path: str, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a csv; raises ``MetadataError`` for non-UTF-8 bytes or
    a missing required column. Rows with a wrong cell count are returned as they are."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MetadataError(f"{path}: row 1: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise MetadataError(f"{path}: row {row} is not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                if header is None:
                    header = [c.strip() for c in cells]
                    header_line = line
                else:
                    rows.append((line, [c.strip() for c in cells]))
            line = reader.line_num + 1
    except csv.Error as e:  # e.g. a NUL byte, or a quote left open at the end of the file
        raise MetadataError(f"{path}: row {line}: not readable as CSV ({e})") from None
    if header is None:
        raise MetadataError(f"{path}: row 1: the file is empty (expected a header with {', '.join(required)})")
    missing = [c for c in required if c not in header]
    if missing:
        raise MetadataError(
            f"{path}: row {header_line} (header) lacks required column(s) {', '.join(missing)}; found {', '.join(header)}"
        )
    return header, rows


def _record(header: list[str], cells: list[str]) -> tuple[dict, str]:
    """The row as a dict, and a problem if its cell count differs from the header's."""
    problem = "" if len(cells) == len(header) else f"{len(cells)} fields, expected {len(header)}"
    return dict(zip(header, cells + [""] * (len(header) - len(cells)))), problem


def _is_folder_name(name: str) -> bool:
    return bool(name) and name.isprintable() and name not in (".", "..") and "/" not in name and "\\" not in name


def _row_problems(record: dict, shape_problem: str, required, id_column: str, allowed: dict) -> list[str]:
    """ "bad metadata row: ..." causes: wrong cell count, empty required cells, an id that is not a
    folder name, values outside ``allowed`` (column -> valid values)."""
    causes = [shape_problem] if shape_problem else []
    causes += [f"missing {column}" for column in required if not record[column]]
    if record[id_column] and not _is_folder_name(record[id_column]):
        causes.append(f"{id_column} {record[id_column]!r} is not a folder name")
    for column, values in allowed.items():
        if record[column] and record[column] not in values:
            causes.append(f"unknown {column} {record[column]!r} (expected {', '.join(values)})")
    return [f"bad metadata row: {cause}" for cause in causes]


def _escape_pattern(name: str) -> str:
    """A name made safe inside a ``str.format`` pattern."""
    return name.replace("{", "{{").replace("}", "}}")


def _keep(value: str, allowed: tuple[str, ...], chosen: tuple[str, ...] | None) -> bool:
    """Filter by subset/split; a row whose value is invalid is always kept, so it is seen."""
    return not chosen or value in chosen or value not in allowed


# ---------------------------------------------------------------- unified layout


def _unified_clips(root: str, subsets, splits, warnings: list[str]) -> list[_Clip]:
    metadata = os.path.join(root, "metadata.csv")
    header, rows = read_metadata(metadata, UNIFIED_COLUMNS)
    label2idx_path = _check_label2idx(os.path.join(root, "label2idx.json"), warnings)

    clips = []
    for line, cells in rows:
        record, shape_problem = _record(header, cells)
        uid, subset, split = record["uid"], record["label"], record["split"]
        if not (_keep(subset, SUBSETS, subsets) and _keep(split, SPLITS, splits)):
            continue
        problems = _row_problems(
            record, shape_problem, ("vid", "uid", "split", "label"), "uid", {"label": SUBSETS, "split": SPLITS}
        )

        row = _empty_row()
        row.update(
            clip_id=uid or f"missing-uid-row{line}",
            vid=record["vid"],
            subset=subset,
            split=split,
            a_obj=record["a_obj"],
            s_min=record["s_min"],
            s_sec=record["s_sec"],
            label2idx_path=label2idx_path,
            source_layout="unified",
            metadata_row=str(line),
        )
        check = ClipCheck(known_problems=problems)
        if subset in SUBSETS and _is_folder_name(uid):
            _unified_files(os.path.join(root, subset, uid), subset, split, row, check)
        clips.append(_Clip(row, check))
    return clips


def annotated_frame_indices(subset: str, split: str) -> list[int]:
    """Frames with labels: all, except v1s (= S4) train, labelled on its first frame only."""
    return [0] if (subset == "v1s" and split == "train") else list(range(FRAMES_PER_SUBSET[subset]))


def _unified_files(clip_dir: str, subset: str, split: str, row: dict, check: ClipCheck) -> None:
    num_frames = FRAMES_PER_SUBSET[subset]
    annotated = annotated_frame_indices(subset, split)
    row.update(
        audio_path=os.path.join(clip_dir, "audio.wav"),
        frames_dir=os.path.join(clip_dir, "frames"),
        num_frames=str(num_frames),
        frame_pattern="{i}.jpg",
        labels_rgb_dir=os.path.join(clip_dir, "labels_rgb"),
        labels_semantic_dir=os.path.join(clip_dir, "labels_semantic"),
        label_pattern="{i}.png",
        annotated_frames=";".join(map(str, annotated)),
    )
    if not os.path.isdir(clip_dir):
        check.known_problems.append("missing clip folder")
        return
    _add_files(row, check, annotated, {"rgb": row["labels_rgb_dir"], "semantic": row["labels_semantic_dir"]})


def _add_files(row: dict, check: ClipCheck, annotated: list[int], label_dirs: dict[str, str]) -> None:
    """Queue the audio, every frame and every annotated frame's labels of a row for opening;
    a whole missing folder is one problem rather than one per file."""
    check.files.append(FileCheck(row["audio_path"], "audio"))
    if os.path.isdir(row["frames_dir"]):
        for i in range(int(row["num_frames"])):
            name = row["frame_pattern"].format(i=i, i1=i + 1)
            check.files.append(FileCheck(os.path.join(row["frames_dir"], name), f"frame {i}"))
    else:
        check.known_problems.append("missing frames folder")
    for kind, directory in label_dirs.items():
        if not os.path.isdir(directory):
            check.known_problems.append(f"missing {kind} labels folder")
            continue
        for i in annotated:
            name = row["label_pattern"].format(i=i, i1=i + 1)
            check.files.append(FileCheck(os.path.join(directory, name), f"{kind} label for annotated frame {i}"))


def _check_label2idx(path: str, warnings: list[str]) -> str:
    """The path if it holds the 71-class mapping, else "" and a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except FileNotFoundError:
        warnings.append(f"{path} is missing: semantic labels cannot be named")
        return ""
    except (ValueError, UnicodeDecodeError) as e:
        warnings.append(f"{path} is not valid JSON ({e})")
        return ""
    if not isinstance(mapping, dict) or len(mapping) != NUM_CLASSES:
        warnings.append(f"{path} has {len(mapping)} entries, expected {NUM_CLASSES}")
    return path


# ---------------------------------------------------------------- AVSBench-object layout

OBJECT_SUBSETS = {  # csv name -> (folder it may sit in, subset, required columns)
    "s4": ("Single-source", "v1s", ("category", "split")),
    "ms3": ("Multi-sources", "v1m", ("split",)),
}


def _object_sources(root: str) -> list[tuple[str, str]]:
    """[(s4 | ms3, csv path)] found in ``root`` or its Single-source / Multi-sources folders."""
    found = []
    for key, (folder, _, _) in OBJECT_SUBSETS.items():
        for candidate in (os.path.join(root, f"{key}_meta_data.csv"), os.path.join(root, folder, f"{key}_meta_data.csv")):
            if os.path.isfile(candidate):
                found.append((key, candidate))
                break
    return found


def _object_clips(root: str, subsets, splits) -> list[_Clip]:
    clips = []
    for key, metadata in _object_sources(root):
        _, subset, required = OBJECT_SUBSETS[key]
        if subsets and subset not in subsets:
            continue
        header, rows = read_metadata(metadata, required)
        name_column = next((c for c in ("name", "video_id", "uid") if c in header), header[0])
        data_dir = os.path.join(os.path.dirname(metadata), f"{key}_data")
        for line, cells in rows:
            record, shape_problem = _record(header, cells)
            name, split = record[name_column], record["split"]
            if not _keep(split, SPLITS, splits):
                continue
            problems = _row_problems(record, shape_problem, (name_column, *required), name_column, {"split": SPLITS})
            row = _empty_row()
            row.update(
                clip_id=name or f"missing-uid-row{line}",
                vid=object_layout_vid(name, subset),
                subset=subset,
                split=split,
                a_obj=record.get("category", ""),
                start_time=record.get("start_time", ""),
                source_layout=f"object-{key}",
                metadata_row=str(line),
            )
            check = ClipCheck(known_problems=problems)
            category = record.get("category", "")
            if _is_folder_name(name) and _is_folder_name(split) and (key != "s4" or _is_folder_name(category)):
                _object_files(data_dir, key, name, split, category, row, check)
            clips.append(_Clip(row, check))
    return clips


def object_layout_vid(name: str, subset: str) -> str:
    """The ``vid`` the unified release gives this clip: the YouTube id without the ``_<n>`` suffix
    for S4 (v1s), the name itself for MS3 (v1m) (there ``vid == uid``; a stripped vid would miss
    every MS3 clip of a file keyed by the unified release's vid, such as SegPref's text cues)."""
    return re.sub(r"_\d+$", "", name) if subset == "v1s" else name


def _object_files(data_dir: str, key: str, name: str, split: str, category: str, row: dict, check: ClipCheck):
    pattern = _escape_pattern(name)
    if key == "s4":
        where = (split, category, name)
        frame_pattern = pattern + "_{i1}.png"
        audio = os.path.join(data_dir, "audio_wav", split, category, name + ".wav")
    else:
        where = (split, name)
        frame_pattern = pattern + ".mp4_{i1}.png"  # MS3 frames keep the video's file name
        audio = os.path.join(data_dir, "audio_wav", split, name + ".wav")
    annotated = annotated_frame_indices("v1s" if key == "s4" else "v1m", split)
    row.update(
        audio_path=audio,
        frames_dir=os.path.join(data_dir, "visual_frames", *(where if key == "s4" else (name,))),
        num_frames="5",
        frame_pattern=frame_pattern,
        labels_binary_dir=os.path.join(data_dir, "gt_masks", *where),
        label_pattern=pattern + "_{i1}.png",
        annotated_frames=";".join(map(str, annotated)),
    )
    _add_files(row, check, annotated, {"binary": row["labels_binary_dir"]})


# ---------------------------------------------------------------- building


def _empty_row() -> dict:
    return {column: "" for column in MANIFEST_COLUMNS}


def detect_layout(root: str) -> str:
    """ "unified" (metadata.csv) or "object" (s4/ms3 meta csv); ``MetadataError`` if neither."""
    if os.path.isfile(os.path.join(root, "metadata.csv")):
        return "unified"
    if _object_sources(root):
        return "object"
    raise MetadataError(
        f"{root}: no metadata.csv (unified AVSBench release) and no s4_meta_data.csv / "
        f"ms3_meta_data.csv (AVSBench-object) found here or in Single-source/ Multi-sources/"
    )


def build_avsbench_manifest(
    root: str,
    subsets: tuple[str, ...] | None = None,
    splits: tuple[str, ...] | None = None,
    workers: int = 16,
    decode: bool = False,
    progress: bool = False,
) -> BuildResult:
    """One row per metadata row (after the subset/split filters), files checked, absolute paths."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise MetadataError(f"{root}: not a directory")
    layout = detect_layout(root)
    warnings: list[str] = []
    if layout == "unified":
        clips = _unified_clips(root, subsets, splits, warnings)
    else:
        clips = _object_clips(root, subsets, splits)

    reports = check_clips([c.check for c in clips], workers=workers, decode=decode, progress=progress)
    seen: set[str] = set()
    for clip, report in zip(clips, reports):
        clip.row.update(report.audio)
        problems = report.problems
        # The first row of a uid is the clip; later ones are flagged, never dropped.
        if clip.row["clip_id"] in seen:
            problems = problems + ["duplicate uid"]
        seen.add(clip.row["clip_id"])
        clip.row["problem"] = "; ".join(problems)

    manifest = pd.DataFrame([c.row for c in clips], columns=list(MANIFEST_COLUMNS))
    return BuildResult(manifest=manifest, layout=layout, warnings=warnings)


# ---------------------------------------------------------------- summary


def problem_kind(problem: str) -> str:
    """ "missing frame 3" -> "missing frame N"; "bad metadata row: unknown label 'x'" -> "bad metadata row"."""
    return re.sub(r"\d+", "N", problem.split(":")[0])


def summarize(manifest: pd.DataFrame, most_common: int = 5, examples: int = 10) -> str:
    """Counts of clips and problem clips per subset/split, the commonest problem kinds and a few
    example clips (bad metadata rows always listed, with their file row)."""
    lines = [f"{'subset':<8}{'split':<8}{'clips':>7}{'problems':>10}"]
    bad = manifest[manifest["problem"] != ""]
    order = {value: rank for rank, value in enumerate(SUBSETS + SPLITS)}  # v1s v1m v2, train val test
    groups = sorted(manifest.groupby(["subset", "split"]), key=lambda g: [order.get(v, 99) for v in g[0]] + list(g[0]))
    for (subset, split), group in groups:
        lines.append(f"{subset or '?':<8}{split or '?':<8}{len(group):>7}{(group['problem'] != '').sum():>10}")
    lines.append(f"{'total':<16}{len(manifest):>7}{len(bad):>10}")
    if len(bad):
        kinds = Counter(problem_kind(p) for cell in bad["problem"] for p in cell.split("; "))
        lines.append("most common problems: " + ", ".join(f"{k} ({n})" for k, n in kinds.most_common(most_common)))
        metadata_rows = bad[bad["problem"].str.contains("bad metadata row")]
        for _, row in metadata_rows.iterrows():
            source = METADATA_FILES.get(row["source_layout"], "metadata")
            lines.append(f"  {source} row {row['metadata_row']}: clip {row['clip_id']}: {row['problem']}")
        others = bad.drop(metadata_rows.index)
        for _, row in others.head(examples).iterrows():
            lines.append(f"  clip {row['clip_id']} ({row['subset']}/{row['split']}): {row['problem']}")
        if len(others) > examples:
            lines.append(f"  ... and {len(others) - examples} more clips with problems (see the problem column)")
    return "\n".join(lines)
