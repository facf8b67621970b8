"""Status, verification and compaction of stage outputs."""

from __future__ import annotations

import json
import os

import numpy as np

from soundstage.cache.index import clip_index, part_listing, read_header, withdrawn_versions
from soundstage.cache.integrity import Verdicts, checked, verify_part
from soundstage.cache.locks import exclusive_lock
from soundstage.cache.quarantine import CorruptPart, failed_parts, record_verdicts, repair_hint
from soundstage.cache.store import CacheError, StageDir, fields_from_schema, fsync_dir, h5py

#: written beside a whole-dataset result when a run reused it for other clips (``--reuse-fit``)
PINNED = "pinned.json"


def stage_status(sd: StageDir) -> dict:
    """What an output holds. A broken part (or stage.json) is listed under ``broken``, never raised."""
    try:
        meta = sd.meta()
    except Exception as e:
        return {
            "stage": os.path.basename(os.path.dirname(sd.path)),
            "fingerprint": os.path.basename(sd.path),
            "kind": "?",
            "path": sd.path,
            "params": {},
            "upstream": {},
            "done": 0,
            "failed": 0,
            "parts": 0,
            "bytes": 0,
            "broken": [f"{sd.meta_path}: unreadable ({e})"],
        }
    parts, broken, extra = sd.part_paths(), [], {}
    done_ids, fitted, failures = set(), False, sd.failures()
    if meta.get("kind") == "global":  # one result, no clips
        fitted = os.path.exists(sd.result_path)
        parts = [sd.result_path] if fitted else []
        if fitted:
            extra["fit"] = fit_status(sd, broken)
    else:
        try:  # from the clip index: parts opened only when new
            index = clip_index(sd)
        except CacheError:  # a part does not open: each is looked at below, the broken ones listed
            index = None
        if index is not None:  # a clip whose committed version was withdrawn is failed, not done
            done_ids = set(np.char.decode(index.ids, "utf-8").tolist()) - set(withdrawn_versions(index, failures))
            extra["no_input_digest"] = int(np.count_nonzero(~index.has_digests | (index.digests == b"")))
        unknown = 0
        for path in parts if index is None else []:
            try:
                with h5py.File(path, "r") as h5:
                    header = read_header(h5, path)
            except Exception as e:
                broken.append(f"{path}: unreadable part file ({type(e).__name__}: {e})")
                continue
            done_ids.update(header.ids)
            unknown += len(header.ids) if header.digests is None else sum(d is None for d in header.digests)
        extra.setdefault("no_input_digest", unknown)
    broken += [f"{p}: failed verification ({'; '.join(v[:2])})" for p, v in _failed_parts_or_note(sd, broken).items()]
    failed = {cid for cid in failures if cid not in done_ids}
    return {
        "stage": meta["stage"],
        "fingerprint": meta["fingerprint"],
        "kind": meta.get("kind", "per_clip"),
        "path": sd.path,
        "params": meta.get("params", {}),
        "upstream": meta.get("upstream", {}),
        "done": int(fitted) if meta.get("kind") == "global" else len(done_ids),
        "failed": len(failed),
        "parts": len(parts),
        "bytes": sum(os.path.getsize(p) for p in parts if os.path.exists(p)),
        "broken": broken,
        **extra,
    }


def _failed_parts_or_note(sd: StageDir, broken: list) -> dict:
    try:
        return failed_parts(sd)
    except CacheError as e:
        broken.append(str(e))
        return {}


def fit_status(sd: StageDir, broken: list) -> dict:
    """The clips a whole-dataset result was fitted on, and whether a run pinned it (``--reuse-fit``)."""
    try:
        with h5py.File(sd.result_path, "r") as h5:
            fit = {"fit_key": h5.attrs.get("fit_key"), "fit_clips": int(h5.attrs.get("fit_clips", -1))}
    except Exception as e:
        broken.append(f"{sd.result_path}: unreadable ({type(e).__name__}: {e})")
        return {}
    if fit["fit_key"] is None:
        fit["note"] = "fitted before soundstage recorded the clips of a fit: the next run refits (or --reuse-fit)"
    pinned = os.path.join(sd.path, PINNED)
    if os.path.exists(pinned):
        with open(pinned, encoding="utf-8") as f:
            fit["pinned"] = json.load(f)
    return fit


def verify_stage(sd: StageDir) -> tuple[list[str], list[str], int]:
    """(problems, notes, clip count) of a stage output; the verdict per part is recorded for readers
    and runs (see ``soundstage.cache.quarantine``)."""
    notes = []
    try:
        meta = sd.meta()
    except Exception as e:
        return [f"stage.json unreadable ({e})"], notes, 0
    if meta.get("kind") == "global":
        if not os.path.exists(sd.result_path):
            return [], ["not computed yet"], 0
        problems, _ = verify_part(sd.result_path, [], per_clip=False)
        record_verdicts(sd, {sd.result_path: problems})
        return problems, notes, 1
    problems, seen, superseded, verdicts = [], set(), 0, {}
    for path in sd.part_paths():
        part_problems, ids = verify_part(path, sd.fields())
        verdicts[path] = part_problems
        problems += part_problems
        superseded += len(seen.intersection(ids))
        seen.update(ids)
    record_verdicts(sd, verdicts)
    if superseded:
        notes.append(f"{superseded} older version(s) of recomputed clips (readers use the newest; compaction drops them)")
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

    Holds the output exclusively (refused while a writer runs, or another compaction). Only the
    newest version of each clip is kept, and every merged part is checksummed first: a damaged
    part is refused, never copied into a fresh one. Each merged part is committed before the
    parts it replaces are removed, so a reader always finds every clip (it re-lists the parts
    when one vanishes) and a crash leaves at worst two identical versions of some clips.
    """
    meta = sd.meta()
    if meta.get("kind") == "global":
        return 0, 0
    with exclusive_lock(sd, "compact"):
        index = clip_index(sd)
        small = [p for p, info in enumerate(index.infos) if info.size < target_bytes]
        if len(small) < 2:
            return len(index.parts), len(index.parts)
        _merge(sd, meta, index, small, writer_id, target_bytes)
        return len(index.parts), len(sd.part_paths())


#: a writer merges its shard's parts smaller than this when it has at least MERGE_MIN_PARTS of them
MERGE_TARGET_BYTES = 64 << 20
MERGE_MIN_PARTS = 16


def merge_shard_parts(
    sd: StageDir, writer_prefix: str, writer_id: str, target_bytes: int = MERGE_TARGET_BYTES, min_parts: int = MERGE_MIN_PARTS
) -> int:
    """Merge the small parts of one shard (names starting with ``writer_prefix``), called by the
    writer of that shard while it holds the shard lock: a slow stage committing every 120 s, or
    many reruns, leave many tiny parts, and each part costs start-up and reading. Safe beside the
    writers of other shards: they write other names, and writers of another shard count are
    refused while this one runs, so no other process commits a version of these parts' clips
    meanwhile. The same rules as ``compact_stage`` (newest versions only, checksummed first,
    commit before removal). Returns how many parts were merged away."""
    mine = [name for name, (size, _) in part_listing(sd).items() if name.startswith(writer_prefix + "-") and size < target_bytes]
    if len(mine) < min_parts:  # the usual case, decided from the listing: the index is not loaded
        return 0
    index = clip_index(sd)
    small = [p for p, info in enumerate(index.infos) if info.name.startswith(writer_prefix + "-") and info.size < target_bytes]
    if len(small) < min_parts:
        return 0
    written = _merge(sd, sd.meta(), index, small, writer_id, target_bytes)
    return len(small) - written


def _merge(sd: StageDir, meta: dict, index, parts: list[int], writer_id: str, target_bytes: int) -> int:
    """Merge the parts at positions ``parts`` of ``index`` (a ``ClipIndex``) into parts of about
    ``target_bytes``; returns how many parts were written."""
    fields = fields_from_schema(meta["fields"])
    sd.commit_floor_ns = max(sd.commit_floor_ns, index.max_committed_ns + 1)
    verdicts = Verdicts(sd)
    for p in parts:
        problems = checked(sd, index.parts[p], fields, verdicts=verdicts)  # never copy damaged bytes into a fresh part
        if problems:
            raise CorruptPart(f"cannot merge parts of {sd.path}: {'; '.join(problems[:3])}; {repair_hint(index.parts[p])}")
    groups, group, size = [], [], 0
    for p in parts:
        group.append(p)
        size += index.infos[p].size
        if size >= target_bytes:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    written = 0
    for seq, group in enumerate(groups):
        rows, digests, versions = [], [], []
        for p in group:
            info = index.infos[p]
            at = index.positions(np.char.decode(info.ids, "utf-8").tolist())
            newest = (index.part[at] == p) & (index.row[at] == np.arange(len(info.ids)))  # older versions are dropped
            for row, (cid, values) in enumerate(_read_part(index.parts[p], fields)):
                if newest[row]:
                    rows.append((cid, values))
                    digests.append(info.digests[row].decode() or None if info.digests is not None else None)
                    versions.append(info.versions[row].decode())  # the same versions: nothing downstream goes stale
        if rows:
            sd.write_part(writer_id, seq, fields, rows, meta, digests=digests, versions=versions)
            written += 1
        for p in group:
            os.remove(index.parts[p])
        fsync_dir(sd.parts_dir)
    record_verdicts(sd, {})  # forgets the verdicts on the parts merged away
    return written
