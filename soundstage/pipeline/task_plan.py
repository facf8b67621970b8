"""Each array task's rows, written by the planner at submission.

An array task could find its share itself: read the manifest and hash every clip id. At 200k
clips and 100 tasks the cluster would then read the manifest 100 times, and each task would hold
all of its ids to keep 2k. The planner has read the manifest already, so at submission it writes
one small file per task of the array, ``<output>/tasks/<plan>/shard-IIIII-of-NNNNN.json``: the
rows of that shard (only the columns the stage reads), its unusable rows (empty or duplicate ids),
and the manifest's size and mtime. The task (``--task-plan DIR``) reads its own file and never
the manifest. A manifest changed since submission (another size or mtime), or a plan file that
cannot be read, makes the task read the manifest after all, and its summary says why: a plan is
a shortcut, never a substitute for the manifest.

Plans of earlier submissions are removed when a new one is written for the same output while
none of its jobs is in the queue (the executor checks that before it submits).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

from soundstage.cache.store import atomic_write_text
from soundstage.cache.table import check_columns
from soundstage.pipeline.shard import in_shard, manifest_columns, shard_of

PLANS_DIR = "tasks"
FORMAT = "soundstage-task-plan/1"


def plan_file(plan_dir: str, shard: tuple[int, int]) -> str:
    return os.path.join(plan_dir, f"shard-{shard[0]:05d}-of-{shard[1]:05d}.json")


def manifest_stamp(path: str) -> list[int]:
    """What tells a manifest changed: its size and mtime."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def write_task_plans(output_dir: str, manifest_path: str, stage, num_shards: int, shard_ids: list[int], read) -> str:
    """Write the rows of each of ``shard_ids`` (of ``num_shards``) for ``stage``'s array tasks;
    returns the plan directory (what ``--task-plan`` names). Earlier plans of the output go.
    ``read``: (stamp, rows, unusable rows) of the manifest as the planner read it (every column;
    the stamp taken before reading, see ``manifest_stamp``)."""
    shards = [(i, num_shards) for i in shard_ids]
    stamp, shares = read[0], _split(stage, manifest_path, read[1], read[2], shards)
    root = os.path.join(output_dir, PLANS_DIR)
    if os.path.isdir(root):
        for old in os.listdir(root):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    plan_dir = os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    os.makedirs(plan_dir)
    for shard, (rows, bad) in zip(shards, shares):
        bad = [(cid, cause) for cid, cause in bad if in_shard(cid, shard)]
        columns = list(rows[0]) if rows else []
        body = {
            "format": FORMAT,
            "manifest": os.path.abspath(manifest_path),
            "manifest_stamp": stamp,
            "shard": list(shard),
            "columns": columns,
            "rows": [[r[c] for c in columns] for r in rows],
            "bad": bad,
        }
        atomic_write_text(plan_file(plan_dir, shard), json.dumps(body, separators=(",", ":")))
    return plan_dir


def _split(stage, manifest_path: str, rows: list[dict], bad: list, shards: list) -> list[tuple[list, list]]:
    """Each shard's rows, with the stage's columns (``manifest_columns``), from rows read already."""
    present = list(rows[0]) if rows else []  # in the manifest's order
    if rows:
        check_columns(manifest_path, present, tuple(stage.required_columns), stage.name)
    wanted = manifest_columns(stage)
    columns = [c for c in present if wanted is None or c in wanted]
    by_shard = {i: [] for i, _ in shards}
    for row in rows:
        k = shard_of(row["clip_id"], shards[0][1])
        if k in by_shard:
            by_shard[k].append({c: row[c] for c in columns})
    return [(by_shard[i], bad) for i, _ in shards]


def read_task_plan(plan_dir: str, manifest_path: str, shard: tuple[int, int]) -> tuple[tuple[list, list] | None, str]:
    """(rows, unusable rows) of ``shard`` from its plan file, or (None, why not): the caller then
    reads the manifest. Only a plan for this very manifest, unchanged since, is used."""
    path = plan_file(plan_dir, shard)
    try:
        stamp = manifest_stamp(manifest_path)
    except OSError as e:
        return None, f"the manifest cannot be read ({e})"
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
        if body.get("format") != FORMAT or body["shard"] != list(shard):
            return None, f"{path} is not a task plan for shard {shard[0]}/{shard[1]}"
        if body["manifest"] != os.path.abspath(manifest_path):
            return None, f"{path} was planned for manifest {body['manifest']}"
        if body["manifest_stamp"] != stamp:
            return None, f"the manifest {manifest_path} changed since the run was submitted"
        columns = body["columns"]
        rows = [dict(zip(columns, values)) for values in body["rows"]]
        return (rows, [tuple(b) for b in body["bad"]]), ""
    except FileNotFoundError:
        return None, f"no task plan {path}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"task plan {path} unreadable ({type(e).__name__}: {e})"
