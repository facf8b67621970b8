"""Reading stage outputs: ``open_stage(stage_dir)`` -> read-only mapping clip_id -> {field: value}.

Safe in DataLoader workers: the reader holds no open HDF5 handle when pickled; each process
opens the part files it needs lazily and keeps at most ``max_open`` of them open (LRU), so
memory stays bounded however many parts there are. libhdf5 serialises calls within a process,
so parallel reading means processes (DataLoader workers), not threads.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping

from soundstage.cache.store import StageDir, fields_from_schema, h5py  # h5py after the locking env var


class StageReader(Mapping):
    def __init__(self, stage_dir: str, fields: list[str] | None = None, max_open: int = 16):
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
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self.refresh()

    # Index: clip id -> (part number, row). Built once here from the parts' clip_id columns.
    def refresh(self) -> None:
        self.parts = self.dir.part_paths()
        self.index: dict[str, tuple[int, int]] = {}
        self.duplicates: list[tuple[str, str]] = []
        self._offsets: dict[int, dict[str, object]] = {}
        for p, path in enumerate(self.parts):
            with h5py.File(path, "r") as h5:
                ids = h5["clip_id"].asstr()[...]
                self._offsets[p] = {f.name: h5[f"offsets/{f.name}"][...] for f in self.fields if f.ragged}
            for row, cid in enumerate(ids):
                if cid in self.index:
                    self.duplicates.append((cid, os.path.basename(path)))
                else:
                    self.index[cid] = (p, row)

    def _handle(self, p: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked: never use the parent's handles
            self._handles = OrderedDict()
            self._pid = os.getpid()
        h5 = self._handles.get(p)
        if h5 is None:
            h5 = h5py.File(self.parts[p], "r")
            self._handles[p] = h5
            while len(self._handles) > self.max_open:
                _, old = self._handles.popitem(last=False)
                old.close()
        else:
            self._handles.move_to_end(p)
        return h5

    def __getitem__(self, clip_id: str) -> dict:
        p, row = self.index[clip_id]
        h5 = self._handle(p)
        out = {}
        for f in self.fields:
            ds = h5[f.name]
            if f.dtype == "str":
                ds = ds.asstr()
            if f.ragged:
                start, stop = self._offsets[p][f.name][row : row + 2]
                value = ds[start:stop]
                out[f.name] = list(value) if f.dtype == "str" else value
            else:
                out[f.name] = ds[row]
        return out

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, clip_id) -> bool:
        return clip_id in self.index

    def close(self) -> None:
        for h5 in self._handles.values():
            h5.close()
        self._handles.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"StageReader({self.meta['stage']}/{self.meta['fingerprint']}, {len(self)} clips)"


def read_result(stage_dir: str) -> dict:
    """The arrays of a whole-dataset stage (``result.h5``), plus its attributes under ``attrs``."""
    path = StageDir(stage_dir).result_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{stage_dir} has no result.h5 (the stage has not finished)")
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
