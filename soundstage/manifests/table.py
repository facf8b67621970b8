"""Reading and writing manifest tables (CSV or Parquet, chosen by the file suffix).

A manifest has one row per clip and at least a ``clip_id`` column. Paths in it may be absolute
or relative to the manifest's own directory (``resolve_path``).
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


def write_manifest(df: pd.DataFrame, path: str) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a manifest."""
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
