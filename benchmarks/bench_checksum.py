"""What guarding reads against corrupt parts costs: checksum each part at first open vs a verify marker.

An output of HuBERT-like clips ([frames, 768] float16, 256 clips per part) is read the way a
training job samples it: a random ``--fraction`` of the clips, in random order, by a fresh reader.

- ``plain``: the reader as it is when no verify failed (the marker is only a stat per part);
- ``checksum at open``: every part is fully checksummed (sha256 of every dataset, as ``verify``
  does) the first time the reader touches it;
- ``verify once``: what ``soundstage verify`` costs for the whole output, paid once.

    python benchmarks/bench_checksum.py [--clips 600] [--fraction 0.1] [--dir /tmp/bench_checksum]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time

import numpy as np

from soundstage.cache import StageDir, open_stage
from soundstage.cache.maintenance import verify_part, verify_stage
from soundstage.pipeline.stage import Field

FIELD = Field("features", "float16", (None, 768))


def build(root: str, clips: int) -> str:
    shutil.rmtree(root, ignore_errors=True)
    sd = StageDir(os.path.join(root, "bench", "0"))
    meta = {
        "stage": "bench",
        "fingerprint": "0",
        "kind": "per_clip",
        "fields": [{"name": FIELD.name, "dtype": FIELD.dtype, "shape": list(FIELD.shape)}],
    }
    sd.initialise(meta)
    rng = np.random.default_rng(0)
    for seq, start in enumerate(range(0, clips, 256)):
        rows = [
            (f"clip{i:06d}", {"features": rng.standard_normal((int(rng.integers(240, 500)), 768)).astype(np.float16)})
            for i in range(start, min(clips, start + 256))
        ]
        sd.write_part("bench", seq, [FIELD], rows, meta)
    return sd.path


def read_sample(path: str, order: list, checksum_at_open: bool) -> float:
    t = time.perf_counter()
    reader = open_stage(path)
    checked = set()
    for cid in order:
        p, _ = reader.index[cid]
        if checksum_at_open and p not in checked:
            problems, _ = verify_part(reader.parts[p], [FIELD])
            assert not problems
            checked.add(p)
        reader[cid]
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--dir", default="/tmp/bench_checksum")
    args = ap.parse_args()
    path = build(args.dir, args.clips)
    size = sum(os.path.getsize(p) for p in StageDir(path).part_paths())
    ids = sorted(open_stage(path))
    order = random.Random(0).sample(ids, max(1, int(len(ids) * args.fraction)))
    results = {}
    for name, flag in (("plain", False), ("checksum at open", True)):
        results[name] = min(read_sample(path, order, flag) for _ in range(3))
    t = time.perf_counter()
    verify_stage(StageDir(path))
    results["verify once"] = time.perf_counter() - t
    print(
        f"{len(ids)} clips, {len(StageDir(path).part_paths())} parts, {size / 1e6:.0f} MB; "
        f"reading {len(order)} random clips ({args.fraction:.0%})"
    )
    for name, seconds in results.items():
        print(f"  {name:<17} {seconds:7.3f} s   {seconds / results['plain']:6.1f}x plain")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
