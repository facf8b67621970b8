"""Deterministic shards: a clip belongs to shard ``hash(clip_id) mod N``.

Membership depends only on the clip id, so it does not change when the manifest grows or is
reordered, and completion is recorded per clip, so N may change between runs.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from soundstage.cache.table import read_manifest


def shard_of(clip_id: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.sha1(clip_id.encode("utf-8")).digest()[:8], "big") % num_shards


def in_shard(clip_id: str, shard: tuple[int, int]) -> bool:
    """Whether the clip belongs to ``shard`` (index, count)."""
    return shard[1] == 1 or shard_of(clip_id, shard[1]) == shard[0]


def select_shard(rows: list[dict], index: int, num_shards: int) -> list[dict]:
    if not 0 <= index < num_shards:
        raise ValueError(f"shard {index}/{num_shards}: the index must be in 0..{num_shards - 1}")
    if num_shards == 1:
        return list(rows)
    return [r for r in rows if shard_of(r["clip_id"], num_shards) == index]


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"bad shard {text!r}: use INDEX/COUNT, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"bad shard {text!r}: need 0 <= INDEX < COUNT")
    return i, n


def shard_from_env() -> tuple[int, int] | None:
    """The shard of a SLURM array task: task id (+ SOUNDSTAGE_SHARD_OFFSET for split arrays) of
    SOUNDSTAGE_NUM_SHARDS (default: SLURM_ARRAY_TASK_COUNT)."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = os.environ.get("SOUNDSTAGE_NUM_SHARDS") or os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None:
        return None
    index = int(task) + int(os.environ.get("SOUNDSTAGE_SHARD_OFFSET", "0"))
    return index, int(count)


def manifest_columns(stage) -> tuple[str, ...] | None:
    """The manifest columns a run of ``stage`` reads: ``clip_id``, its ``reads`` and its
    ``required_columns`` (None: every column, for a stage that does not declare ``reads``)."""
    if stage is None or stage.reads is None:
        return None
    return tuple(dict.fromkeys(("clip_id", *stage.reads, *stage.required_columns)))


def manifest_share(manifest_path: str, stage=None, shard: tuple[int, int] = (0, 1)) -> tuple[list[dict], list[tuple[str, str]]]:
    """The usable rows of ``shard`` (unique, non-empty clip ids) as dicts, and (clip_id, cause) of
    every unusable row. Only the stage's columns are read (``manifest_columns``), and only this
    shard's rows become dicts: an array task's start-up is about its share of the manifest.
    With ``stage``, a manifest lacking one of its ``required_columns`` raises ``ManifestError``."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    needed = (tuple(stage.required_columns), stage.name) if stage is not None else ((), "")
    df = read_manifest(manifest_path, *needed, only=manifest_columns(stage))
    stripped = df["clip_id"].str.strip()
    empty = (stripped == "").to_numpy()
    duplicate = (stripped.duplicated() & ~empty).to_numpy()  # the first row of an id is kept
    bad = [
        (f"<row {k + 2}>", f"empty clip_id in manifest row {k + 2}")  # line 1 is the header
        if empty[k]
        else (stripped.iat[k], f"duplicate clip_id in manifest row {k + 2}")
        for k in np.flatnonzero(empty | duplicate).tolist()
    ]
    usable = np.flatnonzero(~(empty | duplicate))
    if count > 1:
        ids = df["clip_id"].to_numpy()[usable]
        usable = usable[np.fromiter((shard_of(c, count) == index for c in ids), bool, len(usable))]
    return df.iloc[usable].to_dict("records"), bad
