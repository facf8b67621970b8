"""Throughput of the vggish stage against the per-file loop the seed trainers run.

    python benchmarks/bench_vggish.py [--clips 24] [--threads 2] [--workers 2] [--size real|tiny]

Same model (random weights in the torchvggish layout, ``--size real`` = the released network's
shape, 72 M parameters), same 16 kHz PCM_16 wav files (half 5 s, half 10 s), same outputs.

- loop: what AVSBench / Stepping Stones do per item — read the wav as int16, / 32768, log-mel
  examples, one forward per clip (batch = that clip's examples); loading the model once included;
- stage, process only: ``STAGE.process`` on batches of ``--batch`` clips (examples of all clips
  in one forward), the examples computed beforehand (in the runner, decoding workers do that);
- stage, runner: the whole stage through ``run_stage``, decoding inline (0 workers) and with
  ``--workers`` decoding processes that compute the log-mel examples while the model runs; model
  loading, checkpoint hashing, worker start-up and HDF5 commit included;
- cache read: what a trainer does per epoch instead of recomputing: read every clip's cached
  embeddings.

The stage's rows are checked equal to the loop's (max abs difference printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soundstage.cache import open_stage
from soundstage.models import vggish
from soundstage.models.tiny import tiny_config
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import LoadContext
from soundstage.stages.vggish import STAGE, load


def write_clips(root: str, clips: int) -> tuple[str, list[dict]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        seconds = 5 if i % 2 == 0 else 10
        t = np.arange(16000 * seconds) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t) + 0.05 * rng.standard_normal(len(t))
        path = f"clip{i:03d}.wav"
        sf.write(os.path.join(root, path), wave, 16000, subtype="PCM_16")
        rows.append({"clip_id": f"clip{i:03d}", "audio_path": path, "num_frames": str(seconds)})
    manifest = os.path.join(root, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, rows


def per_file_loop(checkpoint: str, root: str, rows: list) -> dict:
    network, out = vggish.load_vggish(checkpoint), {}
    with torch.inference_mode():
        for row in rows:
            ints, _ = sf.read(os.path.join(root, row["audio_path"]), dtype="int16")
            examples = vggish.examples(ints / 32768.0)
            out[row["clip_id"]] = network(torch.from_numpy(examples)[:, None]).numpy()
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", choices=("real", "tiny"), default="real")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = tempfile.mkdtemp(prefix="bench_vggish_")
    manifest, rows = write_clips(root, args.clips)
    audio_s = sum(int(r["num_frames"]) for r in rows)
    torch.manual_seed(0)
    network = vggish.VGGish() if args.size == "real" else vggish.VGGish(**tiny_config("vggish"))
    checkpoint = os.path.join(root, "vggish.pth")
    torch.save(network.state_dict(), checkpoint)
    params = {"checkpoint": checkpoint, "pca_params": None, "pad": "repeat-last", "device": "cpu"}
    model = STAGE.setup(params)

    per_file_loop(checkpoint, root, rows[:1])  # warm-up
    loop_s, reference = timed(lambda: per_file_loop(checkpoint, root, rows))
    ctx = LoadContext(params=params, upstream={}, manifest_dir=root)
    items = [load(row, ctx) for row in rows]
    process_s, outputs = timed(
        lambda: [o for i in range(0, len(items), args.batch) for o in STAGE.process(model, items[i : i + args.batch], params)]
    )
    runners = {}
    for workers in sorted({0, args.workers}):
        runners[workers] = timed(
            lambda w=workers: run_stage(
                STAGE,
                manifest,
                os.path.join(root, f"cache{w}"),
                params,
                workers=w,
                batch_size=args.batch,
                progress=False,
                log=lambda *_: None,
            )
        )
    summary = runners[args.workers][1]
    assert summary.ok and summary.done == len(rows), summary.format()
    reader = open_stage(summary.path)
    read_s, stored = timed(lambda: {cid: reader[cid]["embeddings"] for cid in sorted(reader)})
    diff = max(
        max(np.abs(o["embeddings"] - reference[r["clip_id"]]).max(), np.abs(stored[r["clip_id"]] - reference[r["clip_id"]]).max())
        for o, r in zip(outputs, rows)
    )

    print(
        f"VGGish ({args.size}, {sum(p.numel() for p in network.parameters()) / 1e6:.1f} M parameters), "
        f"{len(rows)} clips, {audio_s} s of 16 kHz audio, {args.threads} threads, {os.cpu_count()} CPUs"
    )
    print(f"{'':40}{'wall s':>8}{'clips/s':>10}{'x realtime':>12}{'vs loop':>10}")
    for name, seconds in [
        ("per-file loop (seed trainers)", loop_s),
        (f"stage process (batch {args.batch}, no decoding)", process_s),
        *[(f"stage via runner ({w} workers)", t) for w, (t, _) in runners.items()],
        ("cache read of every clip", read_s),
    ]:
        print(f"{name:40}{seconds:8.3f}{len(rows) / seconds:10.1f}{audio_s / seconds:12.0f}{loop_s / seconds:9.1f}x")
    print(f"stage rows equal the loop's: max abs difference {diff:.2e}")


if __name__ == "__main__":
    main()
