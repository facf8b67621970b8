"""Reading stage outputs: ``open_stage(stage_dir)`` -> read-only mapping clip_id -> {field: value}.

Safe in DataLoader workers: the reader holds no open file when pickled; each process opens the
part files it needs lazily and keeps at most ``max_open`` of them open (LRU), so memory stays
bounded however many parts there are.

Numeric fields are read through a memory map of the (immutable, contiguous) dataset, located
once when the index is built; a clip is one slice and a copy. Strings go through h5py, whose
library calls are serialised within a process: parallel reading means processes, not threads.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from soundstage.cache.index import newest_versions, read_header, unreadable
from soundstage.cache.maintenance import verify_part
from soundstage.cache.quarantine import CorruptPart, load_verdicts, repair_hint, verdict
from soundstage.cache.store import CacheError, StageDir, fields_from_schema, h5py  # h5py after the locking env var


class MissingClip(KeyError):
    """A clip that is not in a stage output (not computed yet, or failed there)."""

    def __str__(self):
        return str(self.args[0])


class StageReader(Mapping):
    def __init__(self, stage_dir: str, fields: list[str] | None = None, max_open: int = 128):
        self.dir = StageDir(stage_dir)
        if not self.dir.exists():
            raise FileNotFoundError(f"{stage_dir} is not a stage output (no stage.json)")
        self.meta = self.dir.meta()
        self.fields = fields_from_schema(self.meta["fields"])
        if fields is not None:
            known = {f.name for f in self.fields}
            missing = [f for f in fields if f not in known]
            if missing:
                raise KeyError(f"{stage_dir} has no field(s) {missing}; it has {sorted(known)}")
            self.fields = [f for f in self.fields if f.name in fields]
        self.max_open = max_open
        self._open_parts: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the index clip id -> (part, row) and each part's layout from the part files.

        The newest version of a clip wins (see ``soundstage.cache.index``); a part that vanishes
        meanwhile (compaction replaced it) makes the listing start again."""
        for _ in range(20):
            try:
                self._build_index()
                return
            except FileNotFoundError:
                continue
        raise CacheError(f"{self.dir.parts_dir}: parts keep changing while the index is read")

    def _build_index(self) -> None:
        headers, offsets, layouts = [], {}, {}
        for path in self.dir.part_paths():
            try:
                with h5py.File(path, "r") as h5:
                    headers.append(read_header(h5, path))
                    offsets[path] = {f.name: h5[f"offsets/{f.name}"][...] for f in self.fields if f.ragged}
                    layouts[path] = {f.name: _mappable(h5[f.name]) for f in self.fields if f.dtype != "str"}
            except Exception as e:
                if not os.path.exists(path):
                    raise FileNotFoundError(path) from None
                raise unreadable(path, e) from None
        headers.sort(key=lambda h: (h.committed_ns, os.path.basename(h.path)))
        self.parts = [h.path for h in headers]
        self._offsets = [offsets[p] for p in self.parts]  # per part: ragged field -> offsets array
        self._layout = [layouts[p] for p in self.parts]  # per part: numeric field -> (byte offset, dtype, shape) or None
        number = {p: k for k, p in enumerate(self.parts)}
        self._versions = newest_versions(headers)
        self.index = {cid: (number[v.part], v.row) for cid, v in self._versions.items()}
        self.superseded = sum(len(h.ids) for h in headers) - len(self.index)  # older versions of clips
        self._verdicts = load_verdicts(self.dir)
        self._checked: dict[int, list[str]] = {}  # part -> problems, once checked in this process
        self._suspect = any(verdict(self._verdicts, p) for p in self.parts)
        self.close()  # part numbers changed: handles opened under the old ones are dropped

    def digest(self, clip_id: str) -> str | None:
        """Digest of the inputs the clip was computed from (None: recorded before digests were)."""
        return self._versions[clip_id].digest

    def _check(self, p: int) -> None:
        """Refuse a part verify found bad; while the output has one, checksum unverified parts first."""
        if p not in self._checked:
            path = self.parts[p]
            problems = verdict(self._verdicts, path)
            if problems is None and self._suspect:
                problems, _ = verify_part(path, fields_from_schema(self.meta["fields"]))
            self._checked[p] = problems or []
        if self._checked[p]:
            raise CorruptPart(f"{self.parts[p]}: {'; '.join(self._checked[p][:3])}; {repair_hint(self.parts[p])}")

    def _open(self, p: int) -> _OpenPart:
        if os.getpid() != self._pid:  # forked: never use the parent's handles
            self._open_parts = OrderedDict()
            self._pid = os.getpid()
        part = self._open_parts.get(p)
        if part is None:
            part = _OpenPart(self.parts[p], self._layout[p])
            self._open_parts[p] = part
            while len(self._open_parts) > self.max_open:
                _, old = self._open_parts.popitem(last=False)
                old.close()
        else:
            self._open_parts.move_to_end(p)
        return part

    def __getitem__(self, clip_id: str) -> dict:
        try:
            p, row = self.index[clip_id]
        except KeyError:
            meta = self.meta
            raise MissingClip(
                f"no {meta['stage']} output for clip {clip_id} in {meta['fingerprint']} (not computed yet, or it failed there)"
            ) from None
        try:
            return self._read(p, row)
        except FileNotFoundError:  # the part was replaced (compaction): find the clip again
            self.refresh()
            if clip_id not in self.index:
                raise MissingClip(f"clip {clip_id} is no longer in {self.dir.path} (its part was removed)") from None
            return self._read(*self.index[clip_id])

    def _read(self, p: int, row: int) -> dict:
        self._check(p)
        part = self._open(p)
        out = {}
        for f in self.fields:
            if f.ragged:
                start, stop = self._offsets[p][f.name][row : row + 2]
                out[f.name] = part.read(f, slice(int(start), int(stop)))
            else:
                out[f.name] = part.read(f, row)
        return out

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, clip_id) -> bool:
        return clip_id in self.index

    def close(self) -> None:
        for part in self._open_parts.values():
            part.close()
        self._open_parts.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open_parts"] = OrderedDict()
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"StageReader({self.meta['stage']}/{self.meta['fingerprint']}, {len(self)} clips)"


def _mappable(ds) -> tuple | None:
    """Where a contiguous, unfiltered dataset's bytes are in its file (None: read via h5py)."""
    if ds.chunks is not None or ds.compression is not None:
        return None
    offset = ds.id.get_offset()  # None for an empty dataset that has no storage
    return None if offset is None else (offset, ds.dtype, ds.shape)


class _OpenPart:
    """One part file open in this process: a memory map for numbers, h5py only for the rest."""

    def __init__(self, path: str, layout: dict):
        self.path = path
        self.views = {}
        if any(v is not None for v in layout.values()):
            mm = np.memmap(path, mode="r", dtype=np.uint8)
            for name, where in layout.items():
                if where is not None:
                    offset, dtype, shape = where
                    self.views[name] = np.ndarray(shape, dtype=dtype, buffer=mm, offset=offset)
        self._h5 = None

    def read(self, field, index):
        view = self.views.get(field.name)
        if view is not None:
            return np.array(view[index])  # a copy: callers never hold the mapping open
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        ds = self._h5[field.name]
        if field.dtype == "str":
            value = ds.asstr()[index]
            return list(value) if isinstance(index, slice) else value
        return ds[index]

    def close(self):
        self.views = {}
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def read_result(stage_dir: str) -> dict:
    """The arrays of a whole-dataset stage (``result.h5``), plus its attributes under ``attrs``."""
    path = StageDir(stage_dir).result_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{stage_dir} has no result.h5 (the stage has not finished)")
    with h5py.File(path, "r") as h5:
        out = {name: h5[name][...] for name in h5.keys()}
        out["attrs"] = {k: (json.loads(v) if k == "checksums" else v) for k, v in h5.attrs.items()}
    return out


def open_stage(stage_dir: str, fields: list[str] | None = None, max_open: int = 128):
    """A reader for a stage output: a clip mapping for per-clip stages, a dict for global ones."""
    meta = StageDir(stage_dir).meta()
    if meta.get("kind") == "global":
        return read_result(stage_dir)
    return StageReader(stage_dir, fields=fields, max_open=max_open)
