"""Training-stage throughput, side by side in one run.

1. Data pipeline, items (clips) per second: soundstage's Dataset reading the VGGish cue from the
   cache vs the seed trainers' way — the same Dataset without the cue, plus decoding the clip's
   audio and running VGGish on it inside ``__getitem__`` for every item of every epoch. VGGish
   here is the full-size network (the reference layers) with random weights: the cost is the
   architecture's, not the weights'. Frames are processed at 384 x 384, as the seed methods do.
2. Training step time of the tiny audio-conditioned Mask2Former, fp32 vs bf16 autocast, on the
   device given (``cpu`` by default; on a GPU the real-size Swin-base model can be chosen with
   ``--model``).

    python benchmarks/bench_train.py [--clips 48] [--steps 8] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from soundstage.audio import load_audio
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import resolve_path
from soundstage.models import vggish as vggish_model
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.stages import vggish as vggish_stage
from soundstage.train.cues import CueSpec, open_cue
from soundstage.train.data import AVSClips, collate_frames
from soundstage.train.evaluation import model_inputs
from soundstage.train.loop import autocast_for, targets


class RecomputedAudio(torch.utils.data.Dataset):
    """The seed trainers' data path: every item decodes the audio and runs VGGish on it."""

    def __init__(self, frames_only: AVSClips, embedder, params: dict):
        self.data, self.embedder, self.params = frames_only, embedder, params

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        item = self.data[index]
        row = self.data.rows[index]
        audio = load_audio(resolve_path(row["audio_path"], self.data.manifest_dir))
        cue = vggish_stage.embed_waveform(self.embedder, audio.wave, 16000, self.params, int(row["num_frames"]))
        item["audio"] = torch.from_numpy(cue[item["frames"].numpy()])
        return item


def items_per_second(dataset, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(dataset)):
            dataset[i]
    return repeats * len(dataset) / (time.perf_counter() - start)


def step_times(model, batch, device, precision: str, steps: int) -> list[float]:
    autocast = autocast_for(precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mask_labels, class_labels = targets(batch["labels"], device)
    inputs = model_inputs(batch, device)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, lazy init)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast() if autocast else torch.autocast(device.split(":")[0], enabled=False):
            loss = model(**inputs, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="Mask2Former to time (default: the tiny stand-in)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.dir or tempfile.mkdtemp(prefix="bench_train_")

    manifest = make_synthetic_dataset(os.path.join(root, "data"), clips=args.clips, seed=0, workers=1)
    checkpoint = os.path.join(root, "vggish_full_size_random.pth")
    torch.manual_seed(0)
    torch.save(vggish_model.VGGish().state_dict(), checkpoint)
    params = {"checkpoint": checkpoint}
    summary = run_stage(
        get_stage("vggish"), manifest, os.path.join(root, "cache"), params, workers=0, progress=False, log=lambda *_: None
    )
    reader = open_cue(CueSpec("audio", "vggish", "embeddings"), stage_dir=summary.path)
    spec = CueSpec("audio", "vggish", "embeddings")

    cached = AVSClips(manifest, None, {"audio": (spec, reader)}, image_size=384, mask_size=224)
    frames_only = AVSClips(manifest, None, {}, image_size=384, mask_size=224)
    embedder = vggish_stage.setup({**vggish_stage.STAGE.defaults(), **params, "device": "cpu"})
    recomputed = RecomputedAudio(frames_only, embedder, {"pad": "repeat-last"})
    items_per_second(cached)  # warm the page cache for both
    fast, slow = items_per_second(cached), items_per_second(recomputed)
    print(f"data pipeline, {len(cached)} clips at 384x384, CPU, {args.threads} thread(s):")
    print(f"  cached VGGish cue:             {fast:8.1f} clips/s")
    print(f"  VGGish recomputed per item:    {slow:8.1f} clips/s")
    print(f"  ratio cached / recomputed:     {fast / slow:8.1f}x")

    from soundstage.models.avs_mask2former import build_model, tiny_mask2former_spec

    size = args.image_size or (384 if args.model else tiny_mask2former_spec()["image_size"])
    data = AVSClips(manifest, "val", {"audio": (spec, reader)}, image_size=size, mask_size=size)
    batch = collate_frames([data[i] for i in range(min(2, len(data)))])
    model = build_model(args.model, 2, "add", 128).to(args.device).train()
    name = args.model or "tiny stand-in"
    print(
        f"training step, {name}, {len(batch['labels'])} frames of {size}x{size}, device {args.device}"
        + (f", {args.threads} CPU thread(s)" if args.device == "cpu" else "")
        + ":"
    )
    results = {}
    for precision in ("fp32", "bf16"):
        times = step_times(model, batch, args.device, precision, args.steps)
        results[precision] = statistics.median(times)
        print(
            f"  {precision}: median {results[precision] * 1000:8.1f} ms/step  "
            f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {args.steps} steps)"
        )
    print(f"  speed-up bf16 / fp32: {results['fp32'] / results['bf16']:.2f}x")
    np.set_printoptions()


if __name__ == "__main__":
    main()
