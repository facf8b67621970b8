"""How to store the masks stage's probability maps: uint8 (round(255 p)) vs float16.

Clips of 5 or 10 frames of 224 x 224 smooth probability maps (blobs with soft edges, like a
segmentation model's output) are written as cache part files (the store's own writer: contiguous,
unfiltered datasets) in each dtype; printed: bytes per frame, random per-clip read speed through
the cache reader, and the largest error against the float32 maps.

    python benchmarks/bench_masks.py [--clips 200] [--dir /tmp/bench_masks]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from soundstage.cache import StageDir, open_stage
from soundstage.pipeline.stage import Field


def smooth_maps(frames: int, rng: np.random.Generator) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(size=(frames, 1, 7, 7)).astype(np.float32) * 4)
    return torch.sigmoid(F.interpolate(coarse, size=(224, 224), mode="bicubic", align_corners=False))[:, 0].numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--dir", default="/tmp/bench_masks")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    clips = {f"clip{i:05d}": smooth_maps(5 if i % 2 else 10, rng) for i in range(args.clips)}
    frames = sum(len(m) for m in clips.values())
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{args.clips} clips, {frames} frames of 224x224")
    print(f"{'dtype':<8} {'KiB/frame':>10} {'clips/s read':>13} {'max error':>10}")
    for dtype, encode, decode in (
        ("uint8", lambda p: np.rint(p * 255).astype(np.uint8), lambda v: v.astype(np.float32) / 255),
        ("float16", lambda p: p.astype(np.float16), lambda v: v.astype(np.float32)),
    ):
        sd = StageDir(os.path.join(args.dir, dtype))
        field = Field("probs", dtype, (None, None, None))
        meta = {
            "stage": "bench",
            "fingerprint": dtype,
            "fields": [{"name": "probs", "dtype": dtype, "shape": [None, None, None], "help": ""}],
        }
        sd.initialise(meta)
        rows = [(cid, {"probs": encode(m)}) for cid, m in clips.items()]
        sd.write_part("bench", 0, [field], rows, meta)
        size = sum(os.path.getsize(p) for p in sd.part_paths())
        reader = open_stage(sd.path)
        order = list(clips)
        random.Random(0).shuffle(order)
        start = time.perf_counter()
        error = max(float(np.abs(decode(reader[cid]["probs"]) - clips[cid]).max()) for cid in order)
        rate = len(order) / (time.perf_counter() - start)
        print(f"{dtype:<8} {size / frames / 1024:>10.1f} {rate:>13.0f} {error:>10.5f}")


if __name__ == "__main__":
    main()
