"""Deterministic shards: a clip belongs to shard ``hash(clip_id) mod N``.

Membership depends only on the clip id, so it does not change when the manifest grows or is
reordered, and completion is recorded per clip, so N may change between runs.
"""

from __future__ import annotations

import hashlib
import os


def shard_of(clip_id: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.sha1(clip_id.encode("utf-8")).digest()[:8], "big") % num_shards


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
