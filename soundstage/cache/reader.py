"""Reading stage outputs: ``open_stage(stage_dir)`` -> read-only mapping clip_id -> {field: value}.

Opening reads the output's cached clip index (``soundstage.cache.index``), not every part.

Reads cost the same however many parts an output has. Numeric fields are read through a memory
map of the (immutable, contiguous) dataset, located by the index: a clip is one slice and a copy.
The map is made with the file descriptor closed straight after (a mapping does not need one),
so every part stays mapped without holding a descriptor: no open-file limit, no LRU to thrash.
Mappings take address space, not memory; the kernel pages in what is read. Strings go through
h5py, one whole column of a part at a time, kept decoded (up to ``max_strings`` strings, LRU);
h5py's library calls are serialised within a process: parallel reading means processes.

Safe in DataLoader workers: the reader holds no map or open file when pickled, and a forked
process never uses its parent's h5py handles; each process maps what it reads lazily.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from soundstage.cache.index import clip_index, open_part, unreadable, withdrawn_versions
from soundstage.cache.integrity import Verdicts, checked
from soundstage.cache.mapping import map_readonly
from soundstage.cache.quarantine import CorruptPart, repair_hint
from soundstage.cache.store import UTF8_GROUP, StageDir, fields_from_schema, h5py  # h5py after the locking env var


class MissingClip(KeyError):
    """A clip that is not in a stage output (not computed yet, or failed there)."""

    def __str__(self):
        return str(self.args[0])


class StaleClip(MissingClip):
    """A clip whose committed version is not current: its inputs changed and it was not
    recomputed (the recomputation failed, or has not run yet). Its old values are not served."""


class StageReader(Mapping):
    def __init__(self, stage_dir: str, fields: list[str] | None = None, max_open: int = 16, max_strings: int = 4_000_000):
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
        self.max_open = max_open  # h5py handles kept open for numeric datasets that cannot be mapped
        self.max_strings = max_strings  # decoded strings kept (whole columns of parts)
        self.look_every = 1.0  # seconds between looks for parts replaced under the maps (compaction)
        self._reset_handles()
        self.refresh()

    def _reset_handles(self) -> None:
        self._files: dict = {}  # part -> the whole file, mapped
        self._maps: dict = {}  # part -> {field: ndarray view of its mapping}
        self._h5: OrderedDict = OrderedDict()  # part -> open h5py.File (LRU)
        self._strings: OrderedDict = OrderedDict()  # (part, field) -> decoded column (LRU)
        self._strings_held = 0
        self._pid = os.getpid()
        self._next_look = time.monotonic() + 1.0

    def refresh(self) -> None:
        """(Re)load the clip index (cached; parts new since are read, vanished ones dropped).

        The newest version of a clip wins (see ``soundstage.cache.index``); a part that vanishes
        meanwhile (compaction replaced it) makes the listing start again."""
        self._parts_dir_mtime = _mtime_ns(self.dir.parts_dir)
        index = clip_index(self.dir)
        self.parts = index.parts
        self._index = index
        self._offsets = [i.offsets for i in index.infos]  # per part: ragged field -> offsets array
        self._layout = [i.layout for i in index.infos]  # per part: numeric field -> [offset, dtype, shape] or None
        self._lookup: dict | None = None  # clip id -> position, built once many lookups were made
        self._lookups = 0
        self.superseded = index.superseded  # older versions of clips
        self.withdrawn = withdrawn_versions(index, self.dir.failures())  # clip id -> why its version is not current
        self._checked: dict[int, list[str]] = {}  # part -> problems, once checked (or looked up) here
        self._stamps = [(i.size, i.mtime_ns) for i in index.infos]  # what the verdicts are keyed by
        self._verdicts = Verdicts(self.dir)
        self.close()  # part numbers changed: handles opened under the old ones are dropped

    def _position(self, clip_id) -> int | None:
        """Position of the clip in the index: a binary search for the first lookups (an array task
        asks about its share only), a dict once many are made (a training run reads every clip)."""
        if self.withdrawn and clip_id in self.withdrawn:
            return None
        if self._lookup is None:
            self._lookups += 1
            if self._lookups <= 4096:
                k = int(self._index.positions([clip_id])[0]) if isinstance(clip_id, str) else -1
                return k if k >= 0 else None
            self._lookup = dict(zip(np.char.decode(self._index.ids, "utf-8").tolist(), range(len(self._index.ids))))
            self._detach_index()
        return self._lookup.get(clip_id)

    def _detach_index(self) -> None:
        """Copy what reads use of the (memory-mapped) index file into memory. A reader that makes
        many lookups lives long (training) and already holds a dict of every clip, so the copy
        costs little; the index file may then be replaced under it (other jobs committing to the
        output) without this process ever touching a file that is gone (on NFS: ESTALE)."""
        ix = self._index
        ix.ids, ix.part, ix.row = np.array(ix.ids), np.array(ix.part), np.array(ix.row)
        ix.digests, ix.has_digests, ix.version_ids = np.array(ix.digests), np.array(ix.has_digests), np.array(ix.version_ids)
        self._offsets = [{name: np.array(arr) for name, arr in offsets.items()} for offsets in self._offsets]
        ix.infos = []  # their ids and digests are views of the map; reads do not use them

    @property
    def index(self) -> dict:
        """clip id -> (part number, row) of its newest version (built on demand)."""
        ix = self._index
        return {cid.decode(): (int(p), int(r)) for cid, p, r in zip(ix.ids, ix.part, ix.row)}

    def digest(self, clip_id: str) -> str | None:
        """Digest of the inputs the clip was computed from (None: recorded before digests were)."""
        return self._version(clip_id).digest

    def version(self, clip_id: str) -> str:
        """What identifies this computation of the clip: a new id each time it is computed
        (clips committed before versions were recorded: their input digest). Downstream clips
        and whole-dataset fits are keyed by it."""
        return self._version(clip_id).key

    def _version(self, clip_id: str):
        k = self._position(clip_id)
        if k is None:
            raise self._missing(clip_id)
        return self._index.version(k)

    def why_missing(self, clip_id) -> str:
        """Why ``clip_id`` is not served (not computed or failed, or only an outdated version is held)."""
        return str(self._missing(clip_id))

    def _missing(self, clip_id) -> MissingClip:
        """Why ``clip_id`` is not served, as the error to raise."""
        meta = self.meta
        if self.withdrawn and clip_id in self.withdrawn:
            return StaleClip(
                f"{meta['stage']} output {meta['fingerprint']} holds clip {clip_id} only as computed from older "
                f"inputs, which is not served: {self.withdrawn[clip_id]}"
            )
        return MissingClip(
            f"no {meta['stage']} output for clip {clip_id} in {meta['fingerprint']} (not computed yet, or it failed there)"
        )

    def lengths(self, field: str, clip_ids) -> np.ndarray:
        """Rows of the ragged ``field`` per clip of ``clip_ids``, from the index (nothing is read):
        what a caller needs to allocate one array for many clips before filling it."""
        out = np.empty(len(clip_ids), np.int64)
        for k, cid in enumerate(clip_ids):
            at = self._position(cid)
            if at is None:
                raise self._missing(cid)
            p, row = int(self._index.part[at]), int(self._index.row[at])
            offsets = self._offsets[p][field]
            out[k] = offsets[row + 1] - offsets[row]
        return out

    def _check(self, p: int) -> None:
        """Refuse a damaged part: checked the first time any process reads it, the verdict
        remembered (``soundstage.cache.integrity``); here, one lookup per part."""
        problems = self._checked.get(p)
        if problems is None:
            problems = self._checked[p] = checked(
                self.dir,
                self.parts[p],
                fields_from_schema(self.meta["fields"]),
                verdicts=self._verdicts,
                at=self._stamps[p],
                mapped=lambda: self._whole(p),
            )
        if problems:
            path = self.parts[p]
            clips = sorted(np.char.decode(self._index.ids[self._index.part == p], "utf-8").tolist())
            listed = ", ".join(clips[:5]) + (f" and {len(clips) - 5} more" if len(clips) > 5 else "")
            raise CorruptPart(
                f"{path}: {_said(problems, path)}; its clips ({listed}) are not served; {repair_hint(path)}", path, clips
            )

    def __getitem__(self, clip_id: str) -> dict:
        k = self._position(clip_id)
        if k is None:
            raise self._missing(clip_id)
        try:
            return self._read(int(self._index.part[k]), int(self._index.row[k]))
        except FileNotFoundError:  # the part was replaced (compaction): find the clip again
            self.refresh()
            k = self._position(clip_id)
            if k is None:
                raise MissingClip(f"clip {clip_id} is no longer in {self.dir.path} (its part was removed)") from None
            return self._read(int(self._index.part[k]), int(self._index.row[k]))

    def _read(self, p: int, row: int) -> dict:
        if os.getpid() != self._pid:  # forked: never use the parent's h5py handles
            self._reset_handles()
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + self.look_every
            if self._replaced_under_maps():
                raise FileNotFoundError(self.parts[p])  # __getitem__ re-lists and reads the clip again
        self._check(p)
        out = {}
        for f in self.fields:
            index = row
            if f.ragged:
                start, stop = self._offsets[p][f.name][row : row + 2]
                index = slice(int(start), int(stop))
            if f.dtype == "str":
                out[f.name] = self._strings_of(p, f, index)
                continue
            view = self._views(p).get(f.name)
            out[f.name] = np.array(view[index]) if view is not None else self._h5_file(p)[f.name][index]
        return out

    def _replaced_under_maps(self) -> bool:
        """Whether a mapped part was removed (compaction): a map keeps its data readable, but also
        keeps its disk space until unmapped, so the reader moves to the new parts. One stat of the
        parts directory a second; the mapped parts are looked at only when it changed."""
        mtime = _mtime_ns(self.dir.parts_dir)
        if mtime == self._parts_dir_mtime:
            return False
        self._parts_dir_mtime = mtime
        return any(not os.path.exists(self.parts[p]) for p in {*self._maps, *self._files})

    def _whole(self, p: int) -> np.ndarray:
        whole = self._files.get(p)
        if whole is None:
            whole = self._files[p] = map_readonly(self.parts[p])
        return whole

    def _views(self, p: int) -> dict:
        views = self._maps.get(p)
        if views is None:
            views = {}
            layout = {name: where for name, where in self._layout[p].items() if where is not None}
            if layout:
                whole = self._whole(p)
                for name, (offset, dtype, shape) in layout.items():
                    views[name] = np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=whole, offset=offset)
            self._maps[p] = views
        return views

    def _h5_file(self, p: int):
        h5 = self._h5.get(p)
        if h5 is None:
            h5 = self._h5[p] = open_part(self.parts[p])
            while len(self._h5) > self.max_open:
                self._h5.popitem(last=False)[1].close()
        else:
            self._h5.move_to_end(p)
        return h5

    def _strings_of(self, p: int, f, index):
        views = self._views(p)
        blob, offsets = views.get(f"{UTF8_GROUP}/{f.name}"), views.get(f"{UTF8_GROUP}/offsets/{f.name}")
        if blob is None or offsets is None:  # a part written before strings were stored as bytes too
            column = self._string_column(p, f.name)
            return list(column[index]) if f.ragged else column[index]
        if not f.ragged:
            return bytes(blob[offsets[index] : offsets[index + 1]]).decode("utf-8")
        bounds = offsets[index.start : index.stop + 1].tolist()
        text = bytes(blob[bounds[0] : bounds[-1]])
        return [text[a - bounds[0] : b - bounds[0]].decode("utf-8") for a, b in zip(bounds, bounds[1:])]

    def _string_column(self, p: int, name: str):
        key = (p, name)
        column = self._strings.get(key)
        if column is None:
            column = _read_strings(self.parts[p], name)
            self._strings[key] = column
            self._strings_held += len(column)
            while self._strings_held > self.max_strings and len(self._strings) > 1:
                self._strings_held -= len(self._strings.popitem(last=False)[1])
        else:
            self._strings.move_to_end(key)
        return column

    def __iter__(self):
        ids = (cid.decode() for cid in self._index.ids)
        return (cid for cid in ids if cid not in self.withdrawn) if self.withdrawn else ids

    def __len__(self) -> int:
        return len(self._index) - len(self.withdrawn)

    def __contains__(self, clip_id) -> bool:
        return self._position(clip_id) is not None

    def close(self) -> None:
        for h5 in self._h5.values():
            h5.close()
        self._h5.clear()
        self._maps.clear()
        self._files.clear()
        self._strings.clear()
        self._strings_held = 0

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_files={}, _maps={}, _h5=OrderedDict(), _strings=OrderedDict(), _strings_held=0, _lookup=None)
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"StageReader({self.meta['stage']}/{self.meta['fingerprint']}, {len(self)} clips)"


def _read_strings(path: str, name: str) -> np.ndarray:
    """A string dataset of a part, decoded, through h5py's low-level calls: half the cost of
    opening the file as an ``h5py.File`` (what the first read of each part pays)."""
    try:
        fid = h5py.h5f.open(path.encode(), h5py.h5f.ACC_RDONLY)
    except Exception as e:
        if not os.path.exists(path):
            raise FileNotFoundError(path) from None
        raise unreadable(path, e) from None
    try:
        ds = h5py.h5d.open(fid, name.encode())
        raw = np.empty(ds.shape, dtype=h5py.string_dtype())
        ds.read(h5py.h5s.ALL, h5py.h5s.ALL, raw)
    finally:
        fid.close()
    return np.array([v.decode("utf-8") for v in raw], dtype=object)


def _said(problems: list[str], path: str) -> str:
    """The first problems of a part, without the part's name each begins with (the message names its path)."""
    return "; ".join(p.removeprefix(os.path.basename(path) + ": ") for p in problems[:3])


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def read_result(stage_dir: str) -> dict:
    """The arrays of a whole-dataset stage (``result.h5``), plus its attributes under ``attrs``."""
    sd = StageDir(stage_dir)
    path = sd.result_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{stage_dir} has no result.h5 (the stage has not finished)")
    problems = checked(sd, path, [], per_clip=False)
    if problems:
        raise CorruptPart(f"{path}: {_said(problems, path)}; it is not served; {repair_hint(path)}", path)
    with h5py.File(path, "r") as h5:
        out = {name: h5[name][...] for name in h5.keys()}
        out["attrs"] = {k: (json.loads(v) if k == "checksums" else v) for k, v in h5.attrs.items()}
    return out


def open_stage(stage_dir: str, fields: list[str] | None = None, max_open: int = 16):
    """A reader for a stage output: a clip mapping for per-clip stages, a dict for global ones."""
    meta = StageDir(stage_dir).meta()
    if meta.get("kind") == "global":
        return read_result(stage_dir)
    return StageReader(stage_dir, fields=fields, max_open=max_open)
