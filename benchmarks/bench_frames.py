"""Training input: frames read from the frames stage's cache vs decoded and processed per item.

Items per second of the training Dataset (``AVSClips``: every frame of a clip as the model's
input ``[T, 3, S, S]`` plus its masks), one process, S = 384 (the seed methods' Mask2Former), on a
synthetic dataset whose JPEGs are re-saved at ``--width x --height`` (AVSBench frames are video
frames, 720p and up for v2), three ways in the same run:

- ``frames cache``: ``AVSClips`` reading the uint8 frames the ``frames`` stage stored (rescale and
  normalise only);
- ``decode (soundstage)``: ``AVSClips`` decoding each JPEG and resizing it (PIL), every item;
- ``decode + processor``: what the seed trainers do in ``__getitem__`` — decode each JPEG and call
  transformers' ``Mask2FormerImageProcessor`` on it (PIL backend), masks as in the other two.

    python benchmarks/bench_frames.py [--clips 40] [--passes 2] [--width 1280 --height 720] [--dir /tmp/bench_frames]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from soundstage.cache.reader import StageReader
from soundstage.cache.table import read_manifest
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import frame_path
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.data import AVSClips, load_label

SIZE = 384


def resave_frames(manifest: str, width: int, height: int) -> None:
    """Every JPEG of the dataset re-saved at width x height (bilinear upscale, quality 90)."""
    manifest_dir = os.path.dirname(manifest)
    for row in read_manifest(manifest).to_dict("records"):
        for i in range(int(row["num_frames"])):
            path = frame_path(row, i, manifest_dir)
            with Image.open(path) as im:
                big = im.convert("RGB").resize((width, height), Image.BILINEAR)
            big.save(path, quality=90)


class ProcessorClips(torch.utils.data.Dataset):
    """The seed trainers' way: decode + ``Mask2FormerImageProcessor`` per frame, every item."""

    def __init__(self, data: AVSClips):
        from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

        self.data = data
        self.processor = Mask2FormerImageProcessorPil(size={"height": SIZE, "width": SIZE})

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        row = self.data.rows[index]
        frames, _ = self.data.frame_plan(row)
        pixels = []
        for f in frames:
            with Image.open(frame_path(row, f, self.data.manifest_dir)) as im:
                pixels.append(self.processor(im, return_tensors="pt")["pixel_values"][0])
        labels = [load_label(row, f, self.data.manifest_dir, self.data.mask_size, self.data.task) for f in frames]
        return {"pixel_values": torch.stack(pixels), "labels": torch.from_numpy(np.stack(labels))}


def items_per_second(dataset, passes: int) -> tuple[float, torch.Tensor]:
    first = dataset[0]["pixel_values"]  # warm: files opened, page cache filled
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(len(dataset)):
            dataset[i]
    return passes * len(dataset) / (time.perf_counter() - start), first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--dir", default="/tmp/bench_frames")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.dir, ignore_errors=True)
    manifest = make_synthetic_dataset(os.path.join(args.dir, "data"), clips=args.clips, seed=0, workers=2)
    resave_frames(manifest, args.width, args.height)
    cache = os.path.join(args.dir, "cache")
    start = time.perf_counter()
    summary = run_stage(get_stage("frames"), manifest, cache, {"size": SIZE}, workers=0, progress=False, log=lambda *_: None)
    stage_seconds = time.perf_counter() - start

    decoded = AVSClips(manifest, None, {}, SIZE, unlabelled="repeat")
    cached = AVSClips(manifest, None, {}, SIZE, unlabelled="repeat")
    assert cached.use_frames(StageReader(summary.path, fields=["pixels"]), required=True)
    frames = sum(len(decoded.frame_plan(row)[0]) for row in decoded.rows)
    print(f"{len(decoded)} clips, {frames} frames per pass, JPEGs {args.width}x{args.height}, input {SIZE}x{SIZE}, 1 thread")
    print(f"frames stage: {stage_seconds:.1f} s once ({frames / stage_seconds:.1f} frames/s)")
    print(f"{'input':<22} {'items/s':>8} {'frames/s':>9} {'vs processor':>13}")
    rates, firsts = {}, {}
    for name, dataset in (
        ("decode + processor", ProcessorClips(decoded)),
        ("decode (soundstage)", decoded),
        ("frames cache", cached),
    ):
        rates[name], firsts[name] = items_per_second(dataset, args.passes)
        ratio = rates[name] / rates["decode + processor"]
        per_frame = rates[name] * frames / len(decoded)
        print(f"{name:<22} {rates[name]:>8.1f} {per_frame:>9.1f} {ratio:>12.2f}x")
    same = all(torch.allclose(firsts[n], firsts["frames cache"], atol=1e-6, rtol=0) for n in firsts)
    print(f"same pixel_values from all three: {same}")


if __name__ == "__main__":
    main()
