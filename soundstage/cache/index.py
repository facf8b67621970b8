"""Which version of each clip an output holds: the clip index of its committed parts.

A clip may be in several parts: recomputed because its inputs changed (stale), or twice for an
instant while compaction replaces parts. The newest version wins: parts are ordered by their
``committed_ns`` attribute (commit time; 0 for parts written before it was recorded) and then
by name. Each part stores per clip the digest of its inputs (``/input_digest``; absent in parts
written before digests were recorded).

Every error names the part file. A part that vanishes while the index is read (compaction
replaced it) makes the scan start again: compaction commits the merged part before it removes
the old ones, so a fresh listing always holds every clip.

The index is cached in ``<output>/clip_index.npz`` (numpy arrays, no pickle): per part its name,
size and mtime, commit time, clip ids, digests, ragged offsets and where each numeric dataset's
bytes are. Parts are immutable once committed, so an entry holds while a part of that name, size
and mtime is listed; parts that appeared are read and added, parts that vanished (compaction,
quarantine) are dropped, and the file is rewritten atomically (a crash leaves the old file or a
temp file that is ignored; an unreadable index file is rebuilt from the parts). Opening an
output, or deciding a shard's work, then costs one file read instead of opening every part.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import numpy as np

from soundstage.cache.quarantine import CorruptPart, load_verdicts, repair_hint, verdict
from soundstage.cache.store import UTF8_GROUP, CacheError, StageDir, fsync_dir, h5py

DIGEST_DATASET = "input_digest"
INDEX_FILE = "clip_index.npz"
INDEX_FORMAT = "soundstage-clip-index/1"


class UnreadablePart(CacheError):
    """A committed part whose header or index cannot be read (truncated, overwritten, ...)."""


@dataclass
class PartHeader:
    path: str
    committed_ns: int
    ids: list
    digests: list | None  # per clip, None for parts written before digests were recorded


@dataclass(frozen=True)
class ClipVersion:
    part: str  # path of the part holding the newest version
    row: int
    digest: str | None


def read_header(h5, path: str) -> PartHeader:
    """Clip ids, input digests and commit time of an open part file."""
    ids = h5["clip_id"].asstr()[...].tolist()
    digests = [d or None for d in h5[DIGEST_DATASET].asstr()[...].tolist()] if DIGEST_DATASET in h5 else None
    return PartHeader(path, int(h5.attrs.get("committed_ns", 0)), ids, digests)


def unreadable(path: str, error: Exception) -> UnreadablePart:
    return UnreadablePart(f"{path}: unreadable part file ({type(error).__name__}: {error}); {repair_hint(path)}")


def open_part(path: str):
    """An h5py handle on a committed part; FileNotFoundError if it vanished, else a named error."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except Exception as e:
        if not os.path.exists(path):
            raise FileNotFoundError(path) from None
        raise unreadable(path, e) from None


def part_headers(sd: StageDir, attempts: int = 20) -> list[PartHeader]:
    """Headers of the committed parts, oldest commit first, read from the parts themselves."""
    for _ in range(attempts):
        headers = []
        try:
            for path in sd.part_paths():
                with open_part(path) as h5:
                    headers.append(read_header(h5, path))
        except FileNotFoundError:
            continue  # replaced by compaction while we listed: list again
        return sorted(headers, key=lambda h: (h.committed_ns, os.path.basename(h.path)))
    raise CacheError(f"{sd.parts_dir}: parts keep changing while the index is read")


def newest_versions(headers: list[PartHeader]) -> dict[str, ClipVersion]:
    index = {}
    for h in headers:  # oldest first: later versions replace earlier ones
        for row, cid in enumerate(h.ids):
            index[cid] = ClipVersion(h.path, row, h.digests[row] if h.digests is not None else None)
    return index


# ------------------------------------------------------------------------- the cached index


def _encode(strings) -> np.ndarray:
    return np.array([s.encode("utf-8") for s in strings], dtype=bytes) if len(strings) else np.zeros(0, "S1")


@dataclass
class PartInfo:
    """What the index keeps of one committed part."""

    name: str
    size: int
    mtime_ns: int
    committed_ns: int
    ids: np.ndarray  # bytes (UTF-8), one per row
    digests: np.ndarray | None  # bytes, b"" = unknown; None: the part has no digests
    offsets: dict  # ragged field -> int64 [rows + 1]
    layout: dict  # numeric field -> [byte offset, dtype, shape] of a contiguous dataset, or None


def _read_part_info(path: str, fields, stamp: tuple[int, int]) -> PartInfo:
    with h5py.File(path, "r") as h5:
        header = read_header(h5, path)
        offsets = {
            f.name: h5[f"offsets/{f.name}"][...].astype(np.int64) for f in fields if f.ragged and f"offsets/{f.name}" in h5
        }
        layout = {f.name: _mappable(h5[f.name]) for f in fields if f.dtype != "str" and f.name in h5}
        for f in fields:  # string fields as bytes + offsets (parts written before these have none)
            if f.dtype == "str" and f"{UTF8_GROUP}/{f.name}" in h5:
                for name in (f"{UTF8_GROUP}/{f.name}", f"{UTF8_GROUP}/offsets/{f.name}"):
                    layout[name] = _mappable(h5[name])
    digests = None if header.digests is None else _encode([d or "" for d in header.digests])
    return PartInfo(os.path.basename(path), *stamp, header.committed_ns, _encode(header.ids), digests, offsets, layout)


def _mappable(ds) -> list | None:
    """Where a contiguous, unfiltered dataset's bytes are in its file (None: read via h5py)."""
    if ds.chunks is not None or ds.compression is not None:
        return None
    offset = ds.id.get_offset()  # None for an empty dataset that has no storage
    return None if offset is None else [int(offset), ds.dtype.str, list(ds.shape)]


def _listing(sd: StageDir) -> dict[str, tuple[int, int]]:
    """Committed part name -> (size, mtime_ns)."""
    out = {}
    try:
        entries = list(os.scandir(sd.parts_dir))
    except FileNotFoundError:
        return out
    for e in entries:
        if e.name.endswith(".h5") and not e.name.startswith("."):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out[e.name] = (st.st_size, st.st_mtime_ns)
    return out


def index_path(sd: StageDir) -> str:
    return os.path.join(sd.path, INDEX_FILE)


def _load_index_file(sd: StageDir) -> dict[str, PartInfo]:
    """The cached part infos; {} when there is none or it cannot be read (then it is rebuilt)."""
    try:
        with np.load(index_path(sd), allow_pickle=False) as z:
            if bytes(z["format"]).decode() != INDEX_FORMAT:
                return {}
            meta = json.loads(bytes(z["parts"]).decode())
            ids, digests = z["ids"], z["digests"]
            ragged = {name: z[f"offsets.{name}"] for name in meta["ragged"]}
    except Exception:  # absent, or damaged (a disk error, a foreign file): rebuilt from the parts
        return {}
    infos, row, off = {}, 0, 0
    for p in meta["list"]:
        n = p["rows"]
        infos[p["name"]] = PartInfo(
            p["name"],
            p["size"],
            p["mtime_ns"],
            p["committed_ns"],
            ids[row : row + n],
            digests[row : row + n] if p["has_digests"] else None,
            {name: arr[off : off + n + 1] for name, arr in ragged.items() if name in p["ragged"]},
            p["layout"],
        )
        row, off = row + n, off + n + 1
    return infos


def _write_index_file(sd: StageDir, infos: list[PartInfo]) -> None:
    """Atomically replace the index file; best effort (a read-only cache is read without it)."""
    ragged = sorted({name for i in infos for name in i.offsets})
    meta = {
        "ragged": ragged,
        "list": [
            {
                "name": i.name,
                "size": i.size,
                "mtime_ns": i.mtime_ns,
                "committed_ns": i.committed_ns,
                "rows": len(i.ids),
                "has_digests": i.digests is not None,
                "ragged": sorted(i.offsets),
                "layout": i.layout,
            }
            for i in infos
        ],
    }

    def cat(arrays, dtype):
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype)

    arrays = {
        "format": np.frombuffer(INDEX_FORMAT.encode(), np.uint8),
        "parts": np.frombuffer(json.dumps(meta).encode(), np.uint8),
        "ids": cat([i.ids for i in infos], "S1"),
        "digests": cat([i.digests if i.digests is not None else np.full(len(i.ids), b"", "S1") for i in infos], "S1"),
    }
    for name in ragged:  # parts without the field get rows+1 zeros so every part's slice lines up
        arrays[f"offsets.{name}"] = cat([i.offsets.get(name, np.zeros(len(i.ids) + 1, np.int64)) for i in infos], np.int64)
    tmp = os.path.join(sd.path, f".{INDEX_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index_path(sd))
        fsync_dir(sd.path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def part_infos(sd: StageDir, fields=None, attempts: int = 20, write: bool = True) -> list[PartInfo]:
    """Every committed part's info, oldest commit first: the cached index brought up to date with
    the listing (parts read only when new or changed), and the index file rewritten if it moved."""
    fields = sd.fields() if fields is None else fields
    cached = _load_index_file(sd)
    for _ in range(attempts):
        listing = _listing(sd)
        infos, changed = [], set(cached) != set(listing)
        try:
            for name, stamp in sorted(listing.items()):
                info = cached.get(name)
                if info is None or (info.size, info.mtime_ns) != stamp:
                    changed = True
                    path = os.path.join(sd.parts_dir, name)
                    try:
                        info = _read_part_info(path, fields, stamp)
                    except Exception as e:
                        if not os.path.exists(path):
                            raise FileNotFoundError(path) from None
                        raise unreadable(path, e) from None
                infos.append(info)
        except FileNotFoundError:
            continue  # replaced by compaction while we listed: list again
        infos.sort(key=lambda i: (i.committed_ns, i.name))
        if changed and write:
            _write_index_file(sd, infos)
        return infos
    raise CacheError(f"{sd.parts_dir}: parts keep changing while the index is read")


class ClipIndex:
    """The newest version of every committed clip, as arrays (no object per clip).

    ``parts``: part paths, oldest commit first; for the newest versions, sorted by clip id:
    ``ids`` (bytes), ``part`` (position in ``parts``), ``row`` and ``digests`` (bytes, b"" none)."""

    def __init__(self, sd: StageDir, infos: list[PartInfo]):
        self.infos = infos
        self.parts = [os.path.join(sd.parts_dir, i.name) for i in infos]
        rows = [len(i.ids) for i in infos]
        all_ids = np.concatenate([i.ids for i in infos]) if infos else np.zeros(0, "S1")
        part_of = np.repeat(np.arange(len(infos), dtype=np.int32), rows)
        row_of = np.concatenate([np.arange(n, dtype=np.int32) for n in rows]) if infos else np.zeros(0, np.int32)
        # the newest version is the last occurrence in commit order: first in the reversed order
        self.ids, first = np.unique(all_ids[::-1], return_index=True)
        last = len(all_ids) - 1 - first
        self.part, self.row = part_of[last], row_of[last]
        has = np.array([i.digests is not None for i in infos], bool)
        all_digests = (
            np.concatenate([i.digests if i.digests is not None else np.full(len(i.ids), b"", "S1") for i in infos])
            if infos
            else np.zeros(0, "S1")
        )
        self.digests = all_digests[last]
        self.has_digests = has[self.part] if len(has) else np.zeros(0, bool)
        self.superseded = len(all_ids) - len(self.ids)
        self.max_committed_ns = max((i.committed_ns for i in infos), default=0)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, clip_ids) -> np.ndarray:
        """Per clip id its position in ``ids``, -1 when not committed."""
        keys = _encode(list(clip_ids))
        if not len(self.ids) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, keys), len(self.ids) - 1)
        return np.where(self.ids[pos] == keys, pos, -1)

    def version(self, k: int) -> ClipVersion:
        digest = self.digests[k].decode() if self.has_digests[k] else ""
        return ClipVersion(self.parts[self.part[k]], int(self.row[k]), digest or None)

    def versions(self, clip_ids=None) -> dict[str, ClipVersion]:
        """clip id -> newest version, for ``clip_ids`` (default: every committed clip)."""
        if clip_ids is None:
            return {cid.decode(): self.version(k) for k, cid in enumerate(self.ids)}
        clip_ids = list(clip_ids)
        return {cid: self.version(k) for cid, k in zip(clip_ids, self.positions(clip_ids).tolist()) if k >= 0}


def clip_index(sd: StageDir, fields=None) -> ClipIndex:
    return ClipIndex(sd, part_infos(sd, fields))


def committed_index(sd: StageDir, clip_ids=None) -> dict[str, ClipVersion]:
    """clip id -> its newest committed version (only of ``clip_ids`` if given: an array task asks
    about its share). Refuses (naming the files) an output with parts that ``verify`` found bad
    and that are not quarantined yet."""
    index = clip_index(sd)
    sd.commit_floor_ns = max(sd.commit_floor_ns, index.max_committed_ns + 1 if index.parts else 0)
    verdicts = load_verdicts(sd)
    bad = {p: problems for p in index.parts if (problems := verdict(verdicts, p))}
    if bad:
        listing = "; ".join(f"{p}: {', '.join(v[:2])}" for p, v in bad.items())
        raise CorruptPart(f"{len(bad)} part(s) failed verification — {listing}; {repair_hint(next(iter(bad)))}")
    return index.versions(clip_ids)


def has_results(sd: StageDir) -> bool:
    """Whether the output holds anything committed (a part, or a whole-dataset result)."""
    return os.path.exists(sd.result_path) or bool(sd.part_paths())
