"""Reading a manifest table: CSV or Parquet (chosen by the file suffix), one row per clip.

This is the engine's plain reader: it knows only that a manifest has a ``clip_id`` column and
that every cell is read as a string (empty cells as ""). What the other columns mean (audio
paths, frames, labels of AVSBench) is ``soundstage.manifests``' business, which builds on this.
"""

from __future__ import annotations

import os

import pandas as pd

REQUIRED_COLUMNS = ("clip_id",)


class ManifestError(ValueError):
    """A manifest that cannot be used at all (missing file, missing columns)."""


def read_manifest(path: str) -> pd.DataFrame:
    """The manifest at ``path`` with every column as string (empty cells as "")."""
    if not os.path.exists(path):
        raise ManifestError(f"manifest {path} does not exist")
    if str(path).endswith(".parquet"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}")
    return df.fillna("").astype(str)
