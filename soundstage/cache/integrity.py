"""Checking a part before its bytes are served, once per part.

The first time anything reads a part — a downstream stage's upstream reader, ``open_stage``,
``CachedClips``, an export, training — ``checked`` hashes the whole file and compares it with the
checksum stored in its user block (``soundstage.cache.checksum``; xxh3 runs at memory speed, see
``benchmarks/bench_checksum.py``). Parts written before that checksum existed are checked
through their per-dataset sha256 checksums (``verify_part``, slower). The verdict is remembered
per part name + size + mtime (``soundstage.cache.quarantine``: one line appended to the output's
``verified.log``), so the cost is paid once per part across processes and runs; later reads cost
a dictionary lookup per part and reader. Processes that read the same part for the first time at
the same moment (DataLoader workers starting together) may each hash it: no lock is taken,
because hashing costs less than the files a lock would need. A cache that cannot be written
(read-only) is checked once per process.

A bad part raises ``CorruptPart`` naming the part and its clips, and stays refused until
``soundstage verify --repair`` moves it to quarantine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from soundstage.cache.checksum import file_problems
from soundstage.cache.quarantine import VERDICTS, append_verdict, read_verdicts, stamp
from soundstage.cache.store import PART_FORMAT, StageDir, dataset_checksum, h5py


class Verdicts:
    """The verdicts recorded for one output: the log is read once, then only what was appended
    since, when a part is not in it (so checking every part of an output reads the log once)."""

    def __init__(self, sd: StageDir):
        self.sd, self.known, self._offset = sd, {}, 0

    def get(self, name: str, at: tuple[int, int]) -> list[str] | None:
        key = (name, *at)
        if key not in self.known:
            size = (stamp(os.path.join(self.sd.path, VERDICTS)) or (0, 0))[0]
            if size < self._offset:  # rewritten by verify or compaction: read it again
                self.known, self._offset = {}, 0
            if size > self._offset:  # verdicts recorded since (by us, or by other processes)
                self.known, self._offset = read_verdicts(self.sd, self._offset, self.known)
        return self.known.get(key)

    def record(self, name: str, at: tuple[int, int], problems: list[str]) -> None:
        self.known[(name, *at)] = problems
        append_verdict(self.sd, name, at, problems)


def checked(
    sd: StageDir,
    path: str,
    fields,
    per_clip: bool = True,
    verdicts: Verdicts | None = None,
    at: tuple[int, int] | None = None,
    mapped: Callable[[], np.ndarray] | None = None,
) -> list[str]:
    """Problems of the part (``per_clip=False``: the whole-dataset result) at ``path``, [] when
    sound: the recorded verdict, else checked now and recorded. ``at``: its size and mtime when
    known (a reader has them from the clip index); ``mapped``: gives the file mapped (the reader's
    own map: its pages are then read once). FileNotFoundError if it is gone."""
    at = at or stamp(path)
    if at is None:
        raise FileNotFoundError(path)
    verdicts = verdicts or Verdicts(sd)
    name = os.path.basename(path)
    problems = verdicts.get(name, at)
    if problems is None:
        problems = file_problems(path, mapped() if mapped else None)
        if problems is None or problems:  # no file checksum (an older part), or damaged: the full check says what
            problems, _ = verify_part(path, fields, per_clip)
        verdicts.record(name, at, problems)
    return problems


def verify_part(path: str, fields, per_clip: bool = True) -> tuple[list[str], list[str]]:
    """Problems of one part file (or, ``per_clip=False``, a whole-dataset result) and its clip ids."""
    name = os.path.basename(path)
    try:
        problems = file_problems(path) or []
        h5 = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except Exception as e:
        return [f"{name}: does not open ({e})"], []
    with h5:
        if per_clip and h5.attrs.get("format") != PART_FORMAT:
            problems.append(f"{name}: format attribute is {h5.attrs.get('format')!r}, not {PART_FORMAT}")
        try:
            checksums = json.loads(h5.attrs["checksums"])
            ids = h5["clip_id"].asstr()[...].tolist() if per_clip else []
        except Exception as e:
            return [*problems, f"{name}: unreadable index ({e})"], []
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: a clip id appears twice within the part")
        for dataset, expected in checksums.items():
            try:
                actual = dataset_checksum(h5[dataset])  # streamed: one block in memory, not the dataset
            except Exception as e:
                problems.append(f"{name}: dataset {dataset} unreadable ({e})")
                continue
            if actual != expected:
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
