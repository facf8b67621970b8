"""What checking parts at their first read costs: reads with the check vs the same reads without it.

Every part is checked (its file hashed against the xxh3 checksum in its user block) the first time
anything reads it, and the verdict is remembered per part (``soundstage.cache.integrity``). Three
reads of fresh outputs, each run three ways in the same process:

- ``unchecked``: the reader with every part taken as checked (what reading cost before);
- ``first pass``: no verdict recorded yet: each part is hashed at its first read;
- ``later pass``: the verdicts are recorded: one lookup per part and reader.

Each read runs with the parts in the page cache (``warm``: just written, the worst case for the
check, which then costs a pass over memory beside reads that are memory copies) and evicted from
it (``cold``, ``posix_fadvise(DONTNEED)`` on the parts only: what a first epoch over data computed
earlier meets).

Reads:

- ``training epoch``: HuBERT-like clips ([250-500, 768] float16, 256 clips a part) through
  ``CachedClips`` in random order, every clip once (a first epoch);
- ``upstream read``: 100k small clips ([10, 64] float16: per-second values) in manifest order
  through ``open_stage``, as a downstream stage's ``load`` reads its upstream;
- ``10% sample``: a random tenth of the HuBERT-like clips (a short job): the first pass hashes
  whole parts for a few clips each; later passes cost nothing.

    python benchmarks/bench_checksum.py [--clips 600] [--small-clips 100000] [--dir /tmp/bench_checksum]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time

import numpy as np
import pandas as pd

from soundstage.cache import StageDir, open_stage
from soundstage.cache.dataset import CachedClips
from soundstage.cache.quarantine import VERDICTS
from soundstage.pipeline.stage import Field

FEATURES = Field("features", "float16", (None, 768))
SECONDS = Field("probs", "float16", (10, 64))


def build(root: str, name: str, field: Field, clips: int, rows_of) -> tuple[str, list[str]]:
    sd = StageDir(os.path.join(root, name, "0"))
    meta = {
        "stage": name,
        "fingerprint": "0",
        "kind": "per_clip",
        "fields": [{"name": field.name, "dtype": field.dtype, "shape": list(field.shape)}],
    }
    sd.initialise(meta)
    rng = np.random.default_rng(0)
    ids = [f"clip{i:06d}" for i in range(clips)]
    for seq, start in enumerate(range(0, clips, 256)):
        rows = [(cid, {field.name: rows_of(rng)}) for cid in ids[start : start + 256]]
        sd.write_part("bench", seq, [field], rows, meta)
    open_stage(sd.path)  # the clip index, written once
    return sd.path, ids


def forget_verdicts(path: str) -> None:
    if os.path.exists(os.path.join(path, VERDICTS)):
        os.remove(os.path.join(path, VERDICTS))


def unchecked(reader):
    """``reader`` with every part taken as checked: reads as they cost without the check."""
    reader._checked = {p: [] for p in range(len(reader.parts))}
    return reader


def evict(path: str) -> None:
    """Drop the parts' pages from the page cache (they are clean: written and fsynced)."""
    for part in StageDir(path).part_paths():
        fd = os.open(part, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(read, path: str, way: str, cold: bool) -> float:
    if way == "first pass":
        forget_verdicts(path)
    if cold:
        evict(path)
    t = time.perf_counter()
    read(way)
    return time.perf_counter() - t


def epoch(manifest: str, path: str, order: list[int]):
    def read(way):
        clips = CachedClips(manifest, {"hubert": path}, log=lambda *_: None)
        if way == "unchecked":
            unchecked(clips.readers["hubert"])
        for i in order:
            clips[i]

    return read


def clip_reads(path: str, ids: list[str]):
    def read(way):
        reader = open_stage(path)
        if way == "unchecked":
            unchecked(reader)
        for cid in ids:
            reader[cid]

    return read


def report(label: str, read, path: str, repeat: int = 5) -> None:
    ways = ("unchecked", "first pass", "later pass")
    print(f"{label}")
    for cold in (False, True):
        best = {way: float("inf") for way in ways}
        for _ in range(repeat):  # interleaved, so load on the shared machine hits all three alike
            for way in ways:
                best[way] = min(best[way], timed(read, path, way, cold))
        base = best["unchecked"]
        for way in ways:
            print(
                f"  {'cold' if cold else 'warm'} {way:<11} {best[way]:8.3f} s   overhead {100 * (best[way] - base) / base:+6.1f}%"
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--small-clips", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/bench_checksum")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)

    path, ids = build(
        args.dir,
        "hubert",
        FEATURES,
        args.clips,
        lambda rng: rng.standard_normal((int(rng.integers(250, 500)), 768)).astype(np.float16),
    )
    manifest = os.path.join(args.dir, "manifest.csv")
    pd.DataFrame({"clip_id": ids}).to_csv(manifest, index=False)
    size = sum(os.path.getsize(p) for p in StageDir(path).part_paths())
    parts = len(StageDir(path).part_paths())
    order = random.Random(0).sample(range(len(ids)), len(ids))
    report(
        f"training epoch: {len(ids)} clips [250-500, 768] float16, {parts} parts, {size / 1e6:.0f} MB, CachedClips, random order",
        epoch(manifest, path, order),
        path,
    )
    sample = random.Random(1).sample(ids, len(ids) // 10)
    report(f"10% sample: {len(sample)} random clips of the same output", clip_reads(path, sample), path)

    small, small_ids = build(args.dir, "seconds", SECONDS, args.small_clips, lambda rng: rng.random((10, 64)).astype(np.float16))
    size = sum(os.path.getsize(p) for p in StageDir(small).part_paths())
    parts = len(StageDir(small).part_paths())
    report(
        f"upstream read: {len(small_ids)} clips [10, 64] float16, {parts} parts, {size / 1e6:.0f} MB, open_stage, manifest order",
        clip_reads(small, small_ids),
        small,
    )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
