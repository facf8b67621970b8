"""Reading and writing manifest tables (CSV or Parquet, chosen by the file suffix).

A manifest has one row per clip and at least a ``clip_id`` column; ``read_manifest`` is the
engine's plain reader (``soundstage.cache.table``), re-exported here. Paths in it may be absolute
or relative to the manifest's own directory (``resolve_path``).

Columns written by ``soundstage manifest avsbench`` / ``synth`` (all cells are strings):

- ``clip_id`` (the AVSBench ``uid``), ``vid`` (YouTube id; several v2 clips share one),
  ``subset`` (v1s / v1m / v2), ``split`` (train / val / test), ``a_obj``, ``s_min``, ``s_sec``
- ``audio_path``; ``audio_sample_rate``, ``audio_channels``, ``audio_seconds`` (from its header)
- ``frames_dir``, ``num_frames``, ``frame_pattern``: frame i (0-based) is
  ``frames_dir / frame_pattern.format(i=i, i1=i + 1)``: ``{i}.jpg`` in the unified release,
  ``<name>_{i1}.png`` in the older AVSBench-object layout. Use ``frame_path(row, i, dir)``.
- ``labels_rgb_dir`` (colour-coded), ``labels_semantic_dir`` (palette index per pixel),
  ``labels_binary_dir`` (0 / non-zero masks of the object layout; no class), ``label_pattern``;
  use ``label_path(row, i, dir, kind)``. ``annotated_frames``: ";"-joined indices of the
  frames that have labels (v1s train: "0").
- ``problem``: empty for a good clip, else short causes joined by "; ".
- ``label2idx_path``, ``source_layout`` (unified / object-s4 / object-ms3), ``metadata_row``
  (line of the clip in its metadata csv).
"""

from __future__ import annotations

import os

import pandas as pd

from soundstage.cache.table import REQUIRED_COLUMNS, ManifestError, read_manifest  # noqa: F401 (the engine's reader)
from soundstage.pipeline.stage import ClipError

PATH_COLUMNS = ("audio_path", "frames_dir", "labels_rgb_dir", "labels_semantic_dir", "labels_binary_dir", "label2idx_path")
LABEL_KINDS = {"rgb": "labels_rgb_dir", "semantic": "labels_semantic_dir", "binary": "labels_binary_dir"}


def frame_count(row: dict) -> int | None:
    """The clip's ``num_frames`` (video frames, one per second), or None where the cell is empty.

    Anything but a whole number >= 0 is a mistake in the manifest: ``ClipError`` naming the value,
    so the clip is recorded as failed for that reason (never read as 0 or as the audio's length)."""
    value = str(row.get("num_frames", "") or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= 0 and number.is_integer()):
        raise ClipError(f"bad manifest value num_frames={value!r}: not a whole number of video frames >= 0")
    return int(number)


def shown_bytes(name: str) -> str:
    """A file name read from the file system, its bytes that are not UTF-8 shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_manifest(df: pd.DataFrame, path: str) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a manifest. A
    manifest is UTF-8 text: a value that is not (a file name in another encoding) is a
    ``ValueError`` naming it, before anything is written."""
    for column in df.columns:
        for value in df[column]:
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"{path}: column {column} holds '{shown_bytes(value)}', not valid UTF-8 "
                        "(a file name in another encoding); "
                        "rename it, or write paths relative to the manifest (--relative) if only the folder above is affected"
                    ) from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if str(path).endswith(".parquet"):
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def resolve_path(value: str, manifest_dir: str) -> str:
    """A path from a manifest cell, made absolute against the manifest's directory."""
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(manifest_dir, value))


def relative_paths(df: pd.DataFrame, manifest_dir: str) -> pd.DataFrame:
    """A copy of ``df`` whose path columns are relative to ``manifest_dir`` (empty cells stay empty)."""
    out = df.copy()
    for column in PATH_COLUMNS:
        if column in out.columns:
            out[column] = [os.path.relpath(v, manifest_dir) if v else "" for v in out[column]]
    return out


def frame_path(row, i: int, manifest_dir: str) -> str:
    """Absolute path of frame ``i`` (0-based) of a manifest row (a dict or pandas row)."""
    name = row["frame_pattern"].format(i=i, i1=i + 1)
    return os.path.join(resolve_path(row["frames_dir"], manifest_dir), name)


def label_path(row, i: int, manifest_dir: str, kind: str = "semantic") -> str:
    """Absolute path of the label of frame ``i`` (0-based); ``kind`` is rgb, semantic or binary.

    Raises ``ManifestError`` when the row has no labels of that kind (e.g. ``semantic`` for the
    object layout, whose masks are ``binary``). Which frames have labels: ``annotated_frames``.
    """
    directory = row.get(LABEL_KINDS[kind], "") if hasattr(row, "get") else row[LABEL_KINDS[kind]]
    if not directory:
        raise ManifestError(f"clip {row['clip_id']} has no {kind} labels ({LABEL_KINDS[kind]} is empty)")
    return os.path.join(resolve_path(directory, manifest_dir), row["label_pattern"].format(i=i, i1=i + 1))


def mask_kind(row) -> str:
    """The label kind whose non-zero pixels are the sounding objects: "semantic" in the unified
    release, "binary" in the AVSBench-object layout (pass it to ``label_path``)."""
    return "semantic" if row["labels_semantic_dir"] else "binary"


def annotated_frames(row) -> list[int]:
    """Indices of the frames that have labels, from the ``annotated_frames`` cell."""
    return [int(v) for v in str(row["annotated_frames"]).split(";") if v != ""]


def duplicate_ids(df: pd.DataFrame, path: str) -> str | None:
    """Why ``df`` (the manifest at ``path``) cannot be trained or scored on as it is: a clip id in
    several rows (it would count twice); None when every id is one row. Rows are numbered as in
    the file (the header is row 1)."""
    repeated = df["clip_id"][df["clip_id"].duplicated(keep=False)]
    if repeated.empty:
        return None
    first = repeated.iloc[0]
    rows = ", ".join(str(i + 2) for i in range(len(df)) if df["clip_id"].iloc[i] == first)
    others = repeated.nunique() - 1
    return (
        f"manifest {path}: clip_id {first} is in rows {rows}"
        + (f" (and {others} more ids repeat)" if others else "")
        + "; a clip is one row: remove the repeated rows"
    )


def good_clips(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose ``problem`` cell is empty (all rows if the manifest has no such column)."""
    return df[df["problem"] == ""] if "problem" in df.columns else df
