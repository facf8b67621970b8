"""Reading a manifest table: CSV or Parquet (chosen by the file suffix), one row per clip.

This is the engine's plain reader: it knows only that a manifest has a ``clip_id`` column and
that every cell is read as a string (empty cells as ""). What the other columns mean (audio
paths, frames, labels of AVSBench) is ``soundstage.manifests``' business, which builds on this.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_COLUMNS = ("clip_id",)


class ManifestError(ValueError):
    """A manifest that cannot be used at all (missing file, missing columns)."""


def read_manifest(path: str, columns: tuple[str, ...] = (), needed_by: str = "", only=None) -> pd.DataFrame:
    """The manifest at ``path`` with every column as string (empty cells as "").

    ``columns``: further columns that must be there (those a stage reads, ``needed_by`` it); a
    manifest without them is one error, not a failure per clip. ``only``: read just ``clip_id``
    and these columns (those present): a 24-column manifest of 200k clips costs what its few
    columns cost, not what row dictionaries of all of them would."""
    import pandas as pd  # here: a shard process handed its rows (--jobs) never needs it

    if not os.path.exists(path):
        raise ManifestError(f"manifest {path} does not exist")
    wanted = None if only is None else {*REQUIRED_COLUMNS, *columns, *only}
    if str(path).endswith(".parquet"):
        df = pd.read_parquet(path)
        df = df if wanted is None else df[[c for c in df.columns if c in wanted]]
    else:
        usecols = None if wanted is None else wanted.__contains__
        try:  # streamed from the file: memory holds the columns read, not the file
            df = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=usecols, encoding="utf-8-sig")
        except UnicodeDecodeError:
            with open(path, "rb") as f:
                _check_utf8(path, f.read())
            raise
    check_columns(path, df.columns, columns, needed_by)
    return df.fillna("").astype(str)


def check_columns(path: str, present, columns: tuple[str, ...] = (), needed_by: str = "") -> None:
    """``ManifestError`` naming what of ``clip_id`` and ``columns`` the manifest lacks."""
    missing = [c for c in (*REQUIRED_COLUMNS, *columns) if c not in present]
    if missing:
        by = f", which {needed_by} reads" if needed_by else ""
        raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}{by}")


def _check_utf8(path: str, raw: bytes) -> None:
    """Bytes that are not UTF-8: an error naming the row (line 1 is the header)."""
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {path}: row {row} is not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from None
