"""Status, verification and compaction of stage outputs."""

from __future__ import annotations

import json
import os

import numpy as np

from soundstage.cache.store import PART_FORMAT, StageDir, array_checksum, fsync_dir, h5py


def stage_status(sd: StageDir) -> dict:
    meta = sd.meta()
    parts = sd.part_paths()
    if meta.get("kind") == "global":
        done_ids = {"<result>"} if os.path.exists(sd.result_path) else set()
        parts = [sd.result_path] if done_ids else []
    else:
        done_ids = sd.committed_ids()
    failed = {cid for cid in sd.failures() if cid not in done_ids}
    return {
        "stage": meta["stage"],
        "fingerprint": meta["fingerprint"],
        "kind": meta.get("kind", "per_clip"),
        "path": sd.path,
        "params": meta.get("params", {}),
        "upstream": meta.get("upstream", {}),
        "done": len(done_ids),
        "failed": len(failed),
        "parts": len(parts),
        "bytes": sum(os.path.getsize(p) for p in parts),
    }


def verify_part(path: str, fields, per_clip: bool = True) -> tuple[list[str], list[str]]:
    """Problems of one part file (or, ``per_clip=False``, a whole-dataset result) and its clip ids."""
    name = os.path.basename(path)
    try:
        h5 = h5py.File(path, "r")
    except Exception as e:
        return [f"{name}: does not open ({e})"], []
    problems = []
    with h5:
        if per_clip and h5.attrs.get("format") != PART_FORMAT:
            problems.append(f"{name}: format attribute is {h5.attrs.get('format')!r}, not {PART_FORMAT}")
        try:
            checksums = json.loads(h5.attrs["checksums"])
            ids = h5["clip_id"].asstr()[...].tolist() if per_clip else []
        except Exception as e:
            return [f"{name}: unreadable index ({e})"], []
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: a clip id appears twice within the part")
        for dataset, expected in checksums.items():
            try:
                ds = h5[dataset]
                data = ds.asstr()[...] if h5py.check_string_dtype(ds.dtype) else ds[...]
            except Exception as e:
                problems.append(f"{name}: dataset {dataset} unreadable ({e})")
                continue
            if array_checksum(data) != expected:
                problems.append(f"{name}: checksum mismatch in {dataset}")
        for f in fields:
            if f.name not in h5:
                problems.append(f"{name}: field {f.name} missing")
                continue
            rows = h5[f.name].shape[0]
            if f.ragged:
                off = h5[f"offsets/{f.name}"][...] if f"offsets/{f.name}" in h5 else None
                if off is None or len(off) != len(ids) + 1 or off[0] != 0 or off[-1] != rows or np.any(np.diff(off) < 0):
                    problems.append(f"{name}: offsets of {f.name} inconsistent with its {rows} rows and {len(ids)} clips")
            elif rows != len(ids):
                problems.append(f"{name}: {f.name} has {rows} rows for {len(ids)} clips")
    return problems, ids


def verify_stage(sd: StageDir) -> tuple[list[str], list[str], int]:
    """(problems, notes, clip count) of a stage output."""
    notes = []
    try:
        meta = sd.meta()
    except Exception as e:
        return [f"stage.json unreadable ({e})"], notes, 0
    if meta.get("kind") == "global":
        if not os.path.exists(sd.result_path):
            return [], ["not computed yet"], 0
        problems, _ = verify_part(sd.result_path, [], per_clip=False)
        return problems, notes, 1
    problems, seen = [], {}
    for path in sd.part_paths():
        part_problems, ids = verify_part(path, sd.fields())
        problems += part_problems
        for cid in ids:
            if cid in seen:
                problems.append(f"clip {cid} is in both {seen[cid]} and {os.path.basename(path)}")
            else:
                seen[cid] = os.path.basename(path)
    temps = [n for n in os.listdir(sd.parts_dir) if n.startswith(".tmp-")] if os.path.isdir(sd.parts_dir) else []
    if temps:
        notes.append(f"{len(temps)} unfinished temp part(s) of killed writers (ignored; removed by the next run of that shard)")
    return problems, notes, len(seen)


def _read_part(path: str, fields) -> list[tuple[str, dict]]:
    with h5py.File(path, "r") as h5:
        ids = h5["clip_id"].asstr()[...].tolist()
        cols = {}
        for f in fields:
            ds = h5[f.name]
            cols[f.name] = ds.asstr()[...] if f.dtype == "str" else ds[...]
            if f.ragged:
                cols[f"offsets/{f.name}"] = h5[f"offsets/{f.name}"][...]
    rows = []
    for k, cid in enumerate(ids):
        values = {}
        for f in fields:
            if f.ragged:
                a, b = cols[f"offsets/{f.name}"][k : k + 2]
                values[f.name] = list(cols[f.name][a:b]) if f.dtype == "str" else cols[f.name][a:b]
            else:
                values[f.name] = cols[f.name][k]
        rows.append((cid, values))
    return rows


def compact_stage(sd: StageDir, target_bytes: int, writer_id: str) -> tuple[int, int]:
    """Merge parts smaller than ``target_bytes`` into parts of about that size.

    Each merged part is committed before the parts it replaces are removed, so a crash leaves at
    worst the same clips twice (identical values), which the next compaction removes.
    """
    meta = sd.meta()
    if meta.get("kind") == "global":
        return 0, 0
    fields = sd.fields()
    parts = sd.part_paths()
    small = [p for p in parts if os.path.getsize(p) < target_bytes]
    if len(small) < 2:
        return len(parts), len(parts)
    groups, group, size = [], [], 0
    for p in small:
        group.append(p)
        size += os.path.getsize(p)
        if size >= target_bytes:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    seen: set = set()
    for seq, group in enumerate(g for g in groups if len(g) > 1 or len(small) > 1):
        rows = []
        for p in group:
            for cid, values in _read_part(p, fields):
                if cid not in seen:
                    seen.add(cid)
                    rows.append((cid, values))
        sd.write_part(writer_id, seq, fields, rows, meta)
        for p in group:
            os.remove(p)
        fsync_dir(sd.parts_dir)
    return len(parts), len(sd.part_paths())
