"""Which version of each clip an output holds: the clip index of its committed parts.

A clip may be in several parts: recomputed because its inputs changed (stale), or twice for an
instant while compaction replaces parts. The newest version wins: parts are ordered by their
``committed_ns`` attribute (commit time; 0 for parts written before it was recorded) and then
by name. Each part stores per clip the digest of its inputs (``/input_digest``; absent in parts
written before digests were recorded) and its version (``/version``: a new id each time the clip
is computed, kept by compaction; what downstream clips and whole-dataset fits are keyed by, so a
recomputed clip makes what was computed from it stale even when its inputs did not change).

A committed version stops being current when a failure record of its clip withdraws it (its
inputs changed and the recomputation failed, or has not run yet; ``withdrawn``): readers then
refuse the clip with the recorded cause, and status counts it failed.

Every error names the part file. A part that vanishes while the index is read (compaction
replaced it) makes the scan start again: compaction commits the merged part before it removes
the old ones, so a fresh listing always holds every clip.

The index is cached in ``<output>/clip_index.bin`` (raw numpy arrays behind a JSON header, no
pickle): per part its name, size and mtime, commit time, clip ids, digests, ragged offsets and
where each numeric dataset's bytes are, and the newest version of every clip, sorted by id.
Parts are immutable once committed, so the file holds while exactly the parts it lists are
there (same names, sizes, mtimes): then it is memory-mapped and used as it is, and a lookup
touches only the pages it needs (an array task asking about 2k of 200k clips reads 2k ids'
worth). Otherwise parts that appeared are read and added, parts that vanished (compaction,
quarantine, merges) dropped, the newest versions resolved again and the file rewritten
atomically (a crash leaves the old file or a temp file that is ignored; an unreadable index file
is rebuilt from the parts). Opening an output, or deciding a shard's work, then costs one file
map instead of opening every part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass

import numpy as np

from soundstage.cache.mapping import map_readonly
from soundstage.cache.quarantine import CorruptPart, load_verdicts, repair_hint, verdict
from soundstage.cache.store import UTF8_GROUP, CacheError, StageDir, StageStatus, fsync_dir, h5py

DIGEST_DATASET = "input_digest"
VERSION_DATASET = "version"
INDEX_FILE = "clip_index.bin"
LEGACY_INDEX_FILE = "clip_index.npz"  # format 1, replaced by the first rewrite
INDEX_FORMAT = "soundstage-clip-index/3"


class UnreadablePart(CacheError):
    """A committed part whose header or index cannot be read (truncated, overwritten, ...)."""


@dataclass
class PartHeader:
    path: str
    committed_ns: int
    ids: list
    digests: list | None  # per clip, None for parts written before digests were recorded
    versions: list | None = None  # per clip, None for parts written before versions were recorded


@dataclass(frozen=True)
class ClipVersion:
    part: str  # path of the part holding the newest version
    row: int
    digest: str | None
    version: str | None = None  # None: committed before versions were recorded
    withdrawn: str | None = None  # the cause, when a failure record withdrew this version

    @property
    def key(self) -> str:
        """What identifies this version of the clip: its version id, else (older parts) its input digest."""
        return self.version or self.digest or ""


def read_header(h5, path: str) -> PartHeader:
    """Clip ids, input digests and commit time of an open part file."""
    ids = h5["clip_id"].asstr()[...].tolist()
    digests = [d or None for d in h5[DIGEST_DATASET].asstr()[...].tolist()] if DIGEST_DATASET in h5 else None
    versions = [v or None for v in h5[VERSION_DATASET].asstr()[...].tolist()] if VERSION_DATASET in h5 else None
    return PartHeader(path, int(h5.attrs.get("committed_ns", 0)), ids, digests, versions)


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
    versions: np.ndarray  # bytes, b"" = unknown (parts written before versions were recorded)
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
    versions = _encode([v or "" for v in header.versions or [""] * len(header.ids)])
    return PartInfo(os.path.basename(path), *stamp, header.committed_ns, _encode(header.ids), digests, versions, offsets, layout)


def _mappable(ds) -> list | None:
    """Where a contiguous, unfiltered dataset's bytes are in its file (None: read via h5py)."""
    if ds.chunks is not None or ds.compression is not None:
        return None
    offset = ds.id.get_offset()  # None for an empty dataset that has no storage
    return None if offset is None else [int(offset), ds.dtype.str, list(ds.shape)]


def part_listing(sd: StageDir) -> dict[str, tuple[int, int]]:
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


# The index file: MAGIC, the header's length (uint64, little-endian), the header (JSON: the parts
# and where each array is), then the arrays, raw, each at a 64-byte aligned offset from the end
# of the header. Raw arrays can be memory-mapped: opening an output maps the file and a lookup
# pages in only what it touches, so an array task asking about its share of a 200k-clip output
# does not load 200k ids. (An .npz cannot be mapped: np.load reads every member whole.)
MAGIC = b"SSCLIDX2"
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _save_arrays(f, header: dict, arrays: dict[str, np.ndarray]) -> None:
    table, at = {}, 0
    for name, arr in arrays.items():
        table[name] = [at, arr.dtype.str, list(arr.shape)]
        at = _aligned(at + arr.nbytes)
    head = json.dumps({**header, "arrays": table}).encode()
    f.write(MAGIC + len(head).to_bytes(8, "little") + head)
    base = _aligned(16 + len(head))
    f.write(b"\0" * (base - 16 - len(head)))
    for arr in arrays.values():
        data = np.ascontiguousarray(arr).tobytes()
        f.write(data + b"\0" * (_aligned(len(data)) - len(data)))


def _map_arrays(path: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(header, name -> array over the file's map); None when the file is absent or not whole."""
    try:
        buf = map_readonly(path)
    except OSError:
        return None
    if len(buf) < 16 or bytes(buf[:8]) != MAGIC:
        return None
    size = int.from_bytes(bytes(buf[8:16]), "little")
    if 16 + size > len(buf):
        return None
    header = json.loads(bytes(buf[16 : 16 + size]).decode())
    base, arrays = _aligned(16 + size), {}
    for name, (offset, dtype, shape) in header.pop("arrays").items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if base + offset + nbytes > len(buf):
            return None  # truncated
        arrays[name] = np.zeros(shape, dtype) if nbytes == 0 else np.ndarray(shape, dtype, buffer=buf, offset=base + offset)
    return header, arrays


def _load_index_file(sd: StageDir) -> tuple[dict[str, PartInfo], dict | None]:
    """The cached part infos (name -> info) and the resolved newest versions of the clips they
    hold (arrays over the file's map); ({}, None) when there is no usable file (then it is rebuilt)."""
    try:
        mapped = _map_arrays(index_path(sd))
        if mapped is None:
            return {}, None
        header, arrays = mapped
        if header.get("format") != INDEX_FORMAT:
            return {}, None
        ids, digests, versions = arrays["ids"], arrays["digests"], arrays["versions"]
        infos, row, off = {}, 0, 0
        for p in header["list"]:
            n = p["rows"]
            infos[p["name"]] = PartInfo(
                p["name"],
                p["size"],
                p["mtime_ns"],
                p["committed_ns"],
                ids[row : row + n],
                digests[row : row + n] if p["has_digests"] else None,
                versions[row : row + n],
                {name: arrays[f"offsets.{name}"][off : off + n + 1] for name in p["ragged"]},
                p["layout"],
            )
            row, off = row + n, off + n + 1
        view = {name[len("view.") :]: arr for name, arr in arrays.items() if name.startswith("view.")}
        view["superseded"] = header["superseded"]
        return infos, view
    except Exception:  # damaged (a disk error, a foreign file): rebuilt from the parts
        return {}, None


def _write_index_file(sd: StageDir, index: ClipIndex) -> None:
    """Atomically replace the index file; best effort (a read-only cache is read without it)."""
    infos = index.infos
    ragged = sorted({name for i in infos for name in i.offsets})
    header = {
        "format": INDEX_FORMAT,
        "superseded": index.superseded,
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

    all_ids, all_digests, all_versions = _concatenated(infos)
    arrays = {
        "ids": all_ids,
        "digests": all_digests,
        "versions": all_versions,
        # the newest versions, sorted by clip id: what lookups read
        "view.ids": index.ids,
        "view.part": index.part,
        "view.row": index.row,
        "view.digests": index.digests,
        "view.has_digests": index.has_digests,
        "view.versions": index.version_ids,
    }
    for name in ragged:  # parts without the field get rows+1 zeros so every part's slice lines up
        arrays[f"offsets.{name}"] = np.concatenate([i.offsets.get(name, np.zeros(len(i.ids) + 1, np.int64)) for i in infos])
    tmp = os.path.join(sd.path, f".{INDEX_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            _save_arrays(f, header, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index_path(sd))
        fsync_dir(sd.path)
        legacy = os.path.join(sd.path, LEGACY_INDEX_FILE)
        if os.path.exists(legacy):
            os.remove(legacy)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def clip_index(sd: StageDir, fields=None, attempts: int = 20, write: bool = True) -> ClipIndex:
    """The clip index of ``sd``'s committed parts. When the index file lists exactly the parts
    there are (same names, sizes and mtimes), it is used as it is, mapped: nothing is read but
    what lookups touch. Otherwise it is brought up to date (parts read only when new or changed,
    vanished ones dropped), the newest versions resolved again, and the file rewritten."""
    cached, view = _load_index_file(sd)
    for _ in range(attempts):
        listing = part_listing(sd)
        if view is not None and listing.keys() == cached.keys():
            if all((i.size, i.mtime_ns) == listing[name] for name, i in cached.items()):
                return ClipIndex(sd, list(cached.values()), view)
        infos = []
        try:
            for name, stamp in sorted(listing.items()):
                info = cached.get(name)
                if info is None or (info.size, info.mtime_ns) != stamp:
                    path = os.path.join(sd.parts_dir, name)
                    fields = sd.fields() if fields is None else fields  # stage.json, read only when needed
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
        index = ClipIndex(sd, infos)
        if write:
            _write_index_file(sd, index)
        return index
    raise CacheError(f"{sd.parts_dir}: parts keep changing while the index is read")


class ClipIndex:
    """The newest version of every committed clip, as arrays (no object per clip).

    ``parts``: part paths, oldest commit first; for the newest versions, sorted by clip id:
    ``ids`` (bytes), ``part`` (position in ``parts``), ``row``, ``digests`` and ``versions``
    (bytes, b"" none).
    ``view``: those arrays resolved already for exactly ``infos`` (from the index file)."""

    def __init__(self, sd: StageDir, infos: list[PartInfo], view: dict | None = None):
        self.infos = infos
        self.parts = [os.path.join(sd.parts_dir, i.name) for i in infos]
        self.max_committed_ns = max((i.committed_ns for i in infos), default=0)
        if view is None:
            view = _resolve(infos)
        self.ids, self.part, self.row = view["ids"], view["part"], view["row"]
        self.digests, self.has_digests, self.superseded = view["digests"], view["has_digests"], view["superseded"]
        self.version_ids = view["versions"]

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, clip_ids) -> np.ndarray:
        """Per clip id its position in ``ids``, -1 when not committed. A binary search per id:
        over a mapped index it touches a few pages per id, never the whole array."""
        keys = _encode(list(clip_ids))
        out = np.full(len(keys), -1, np.int64)
        if not len(self.ids) or not len(keys):
            return out
        width = self.ids.dtype.itemsize
        fits = np.char.str_len(keys) <= width  # a longer id is not in the index (and casting the
        keys = keys[fits].astype(self.ids.dtype)  # index up to its width would copy all of it)
        pos = np.minimum(np.searchsorted(self.ids, keys), len(self.ids) - 1)
        out[fits] = np.where(self.ids[pos] == keys, pos, -1)
        return out

    def version(self, k: int) -> ClipVersion:
        digest = self.digests[k].decode() if self.has_digests[k] else ""
        return ClipVersion(self.parts[self.part[k]], int(self.row[k]), digest or None, self.version_ids[k].decode() or None)

    def versions(self, clip_ids=None) -> dict[str, ClipVersion]:
        """clip id -> newest version, for ``clip_ids`` (default: every committed clip)."""
        if clip_ids is None:
            return {cid.decode(): self.version(k) for k, cid in enumerate(self.ids)}
        clip_ids = list(clip_ids)
        return {cid: self.version(k) for cid, k in zip(clip_ids, self.positions(clip_ids).tolist()) if k >= 0}


def _concatenated(infos: list[PartInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every part's clip ids, input digests and versions, end to end (b"" digests for parts without any)."""
    if not infos:
        return np.zeros(0, "S1"), np.zeros(0, "S1"), np.zeros(0, "S1")
    ids = np.concatenate([i.ids for i in infos])
    digests = np.concatenate([i.digests if i.digests is not None else np.full(len(i.ids), b"", "S1") for i in infos])
    return ids, digests, np.concatenate([i.versions for i in infos])


def _resolve(infos: list[PartInfo]) -> dict:
    """The newest version of every clip in ``infos`` (oldest commit first), sorted by clip id."""
    rows = [len(i.ids) for i in infos]
    all_ids, all_digests, all_versions = _concatenated(infos)
    part_of = np.repeat(np.arange(len(infos), dtype=np.int32), rows)
    row_of = np.concatenate([np.arange(n, dtype=np.int32) for n in rows]) if infos else np.zeros(0, np.int32)
    # the newest version is the last occurrence in commit order: first in the reversed order
    ids, first = np.unique(all_ids[::-1], return_index=True)
    last = len(all_ids) - 1 - first
    has = np.array([i.digests is not None for i in infos], bool)
    return {
        "ids": ids,
        "part": part_of[last],
        "row": row_of[last],
        "digests": all_digests[last],
        "versions": all_versions[last],
        "has_digests": has[part_of[last]] if len(has) else np.zeros(0, bool),
        "superseded": len(all_ids) - len(ids),
    }


def withdrawn_versions(index: ClipIndex, failures: dict) -> dict[str, str]:
    """clip id -> cause, for the committed clips whose newest version a failure record withdrew
    (``failures``: the latest record per clip, ``StageDir.failures``)."""
    records = {cid: rec for cid, rec in failures.items() if rec.get("withdraws")}
    ids = list(records)
    return {
        cid: records[cid]["cause"]
        for cid, k in zip(ids, index.positions(ids).tolist())
        if k >= 0 and index.version(k).key == records[cid]["withdraws"]
    }


def committed_index(sd: StageDir, clip_ids=None) -> dict[str, ClipVersion]:
    """clip id -> its newest committed version (only of ``clip_ids`` if given: an array task asks
    about its share), with ``withdrawn`` set for a version that is no longer current. Refuses
    (naming the files) an output with parts found bad and not quarantined yet."""
    index = clip_index(sd)
    sd.commit_floor_ns = max(sd.commit_floor_ns, index.max_committed_ns + 1 if index.parts else 0)
    verdicts = load_verdicts(sd)
    bad = {p: problems for p in index.parts if (problems := verdict(verdicts, p))}
    if bad:
        listing = "; ".join(f"{p}: {', '.join(v[:2])}" for p, v in bad.items())
        raise CorruptPart(f"{len(bad)} part(s) failed verification — {listing}; {repair_hint(next(iter(bad)))}")
    versions = index.versions(clip_ids)
    for cid, cause in withdrawn_versions(index, sd.failures()).items():
        if cid in versions:
            versions[cid] = dataclasses.replace(versions[cid], withdrawn=cause)
    return versions


def output_status(sd: StageDir, clip_ids=None, whole_dataset: bool | None = None) -> StageStatus:
    """What is committed and failed of ``clip_ids`` (default: every clip the output knows of),
    from the clip index (no part is opened unless it is new). Whole-dataset outputs: whether the
    result is there. ``whole_dataset``: the stage's kind, for an output that may not exist yet
    (default: what its stage.json says)."""
    whole = whole_dataset if whole_dataset is not None else sd.exists() and sd.meta().get("kind") == "global"
    if whole:
        return StageStatus(True, (), frozenset(), {}, fitted=os.path.exists(sd.result_path))
    exists = sd.exists()
    index = clip_index(sd) if exists else None
    failures = sd.failures() if exists else {}
    withdrawn = withdrawn_versions(index, failures) if index is not None else {}
    if clip_ids is None:
        committed = set(np.char.decode(index.ids, "utf-8").tolist()) if index is not None else set()
        ids = tuple(sorted(committed | set(failures)))
        done = frozenset(committed - set(withdrawn))
    else:
        ids = tuple(clip_ids)
        found = index.positions(ids) >= 0 if index is not None else np.zeros(len(ids), bool)
        done = frozenset(cid for cid, ok in zip(ids, found.tolist()) if ok and cid not in withdrawn)
    asked = set(ids)
    failed = {cid: rec for cid, rec in failures.items() if cid in asked and cid not in done}
    return StageStatus(False, ids, done, failed)


def has_results(sd: StageDir) -> bool:
    """Whether the output holds anything committed (a part, or a whole-dataset result)."""
    return os.path.exists(sd.result_path) or bool(sd.part_paths())
