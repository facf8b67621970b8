"""Random-access per-clip read throughput: soundstage's packed HDF5 cache vs one file per clip.

The research code keeps one ``.pth`` per clip (``torch.save`` of a tensor); the other obvious
choice is one ``.npy`` per clip. Same data, same process, same random order; reported as clips/s
and as ratios. Two shapes: HuBERT-like features (ragged [frames, 768] float16) and small
per-second probabilities ([10, 527] float16), where per-file overhead dominates.

    python benchmarks/bench_cache.py [--clips 1000] [--small-clips 5000] [--dir /tmp/bench_cache]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch

from soundstage.cache import StageDir, open_stage
from soundstage.pipeline.stage import Field


def make_data(n: int, shape_fn, seed: int):
    rng = np.random.default_rng(seed)
    return {f"clip{i:06d}": rng.standard_normal(shape_fn(rng)).astype(np.float16) for i in range(n)}


def write_all(root: str, data: dict, field: Field):
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "pth"))
    os.makedirs(os.path.join(root, "npy"))
    for cid, arr in data.items():
        torch.save(torch.from_numpy(arr), os.path.join(root, "pth", f"{cid}.pth"))
        np.save(os.path.join(root, "npy", f"{cid}.npy"), arr)
    sd = StageDir(os.path.join(root, "cache", "bench", "0"))
    meta = {
        "stage": "bench",
        "fingerprint": "0",
        "kind": "per_clip",
        "fields": [{"name": field.name, "dtype": field.dtype, "shape": list(field.shape)}],
    }
    sd.initialise(meta)
    items = list(data.items())
    for seq, start in enumerate(range(0, len(items), 256)):
        rows = [(cid, {field.name: arr}) for cid, arr in items[start : start + 256]]
        sd.write_part("bench", seq, [field], rows, meta)
    return sd.path


def timed(fn, order, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        total = 0
        for cid in order:
            total += fn(cid).shape[0]
        best = min(best, time.perf_counter() - t)
    return len(order) / best


def bench(name: str, root: str, data: dict, field: Field):
    stage_dir = write_all(root, data, field)
    order = list(data)
    np.random.default_rng(0).shuffle(order)
    reader = open_stage(stage_dir)
    rates = {
        "soundstage HDF5": timed(lambda cid: reader[cid][field.name], order),
        "one .pth per clip": timed(lambda cid: torch.load(os.path.join(root, "pth", f"{cid}.pth"), weights_only=True), order),
        "one .npy per clip": timed(lambda cid: np.load(os.path.join(root, "npy", f"{cid}.npy")), order),
    }
    for cid in order[:20]:  # the same numbers come back
        np.testing.assert_array_equal(reader[cid][field.name], data[cid])
    sizes = {
        "soundstage HDF5": sum(os.path.getsize(p) for p in StageDir(stage_dir).part_paths()),
        "one .pth per clip": sum(e.stat().st_size for e in os.scandir(os.path.join(root, "pth"))),
        "one .npy per clip": sum(e.stat().st_size for e in os.scandir(os.path.join(root, "npy"))),
    }
    base = rates["one .pth per clip"]
    print(f"\n{name}: {len(data)} clips, random order, warm page cache")
    print(f"{'format':<20}{'clips/s':>12}{'vs .pth':>10}{'files':>8}{'MB':>10}")
    for fmt, rate in rates.items():
        files = len(StageDir(stage_dir).part_paths()) if fmt.startswith("soundstage") else len(data)
        print(f"{fmt:<20}{rate:>12.0f}{rate / base:>9.2f}x{files:>8}{sizes[fmt] / 1e6:>10.1f}")
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--small-clips", type=int, default=5000)
    ap.add_argument("--dir", default="/tmp/soundstage_bench_cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench(
        "HuBERT-like features [250 or 500, 768] float16",
        os.path.join(args.dir, "features"),
        make_data(args.clips, lambda rng: (int(rng.choice([250, 500])), 768), 0),
        Field("features", "float16", (None, 768)),
    )
    bench(
        "per-second probabilities [10, 527] float16",
        os.path.join(args.dir, "probs"),
        make_data(args.small_clips, lambda rng: (10, 527), 1),
        Field("probs", "float16", (10, 527)),
    )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
