"""Throughput of the beats stage against a one-clip-at-a-time loop, and achieved FLOP/s.

    python benchmarks/bench_beats.py [--clips 8] [--seconds 5] [--threads 2] [--size real|tiny]

Both sides use the same model (random weights in the official checkpoint format, saved and
loaded through ``BEATs.from_checkpoint``; ``--size real`` is the iter3+ shape: 12 layers, 768
wide) and compute the same outputs per clip: one pass over the whole clip and one per 1 s window.

- stage: ``STAGE.process`` on batches of ``--batch`` equal-length clips (what the runner calls;
  all full 1 s windows of a batch share one forward pass);
- loop: per clip, ``extract_features`` on the clip, then on each second, batch size 1.

FLOPs of one clip are counted with ``torch.utils.flop_counter`` (matmuls, convolutions,
attention); the matmul roofline is the best of a few float32 2048^3 ``torch.mm`` on the same
threads. On a shared machine wall-clock rates understate both sides; the "per CPU s" column
compares FLOPs per CPU second of this process with the matmul's. A last line runs the whole
stage through the runner on the synthetic dataset (decode, batching, HDF5 commit included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soundstage.models.beats import BEATs  # noqa: E402
from soundstage.models.fbank import num_frames  # noqa: E402
from soundstage.models.tiny import tiny_beats_cfg  # noqa: E402
from soundstage.stages.beats import STAGE  # noqa: E402

REAL = dict(
    embed_dim=512,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    conv_pos=128,
    conv_pos_groups=16,
    num_buckets=320,
    max_distance=800,
)


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best float32 n^3 matmul rate per wall second and per CPU second of this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    runs = [_timed(lambda: torch.mm(a, b)) for _ in range(repeats)]
    return 2 * n**3 / min(w for w, _ in runs), 2 * n**3 / min(c for _, c in runs)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def attention_flops(model: BEATs, samples: int) -> float:
    """q k^T and attention x v of every layer (the counter misses CPU SDPA with a bias mask)."""
    patches = (num_frames(samples) // model.patch_size) * (128 // model.patch_size)
    return 4 * patches**2 * model.embed_dim * len(model.encoder.layers)


def clip_flops(model: BEATs, wave: np.ndarray) -> float:
    """FLOPs the stage spends on one clip: the whole clip plus each 1 s window."""
    from torch.utils.flop_counter import FlopCounterMode

    seconds = len(wave) // 16000
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        STAGE.process(model, [{"wave": wave, "seconds": seconds}], {})
    return counter.get_total_flops() + attention_flops(model, len(wave)) + seconds * attention_flops(model, 16000)


def one_at_a_time(model: BEATs, items: list) -> None:
    with torch.inference_mode():
        for item in items:
            wave = torch.from_numpy(item["wave"])[None]
            model.extract_features(wave)
            for s in range(item["seconds"]):
                window = wave[:, s * 16000 : (s + 1) * 16000]
                features, _ = model.encode(window)
                model.classify(features)
                features.mean(dim=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", choices=("real", "tiny"), default="real")
    ap.add_argument("--runner-clips", type=int, default=8, help="clips of the synthetic dataset for the runner row (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = tempfile.mkdtemp(prefix="bench_beats_")
    cfg = tiny_beats_cfg(predictor_class=527, **(REAL if args.size == "real" else {}))  # the AudioSet head
    model = BEATs(cfg)
    model.label_dict = {i: f"/m/bench{i}" for i in range(cfg["predictor_class"])}
    path = os.path.join(tmp, "beats.pt")
    model.save_checkpoint(path)
    model = STAGE.setup({"checkpoint": path, "device": "cpu", "dtype": "fp32"})

    rng = np.random.default_rng(0)
    items = [
        {"wave": (0.1 * rng.standard_normal(16000 * args.seconds)).astype(np.float32), "seconds": args.seconds}
        for _ in range(args.clips)
    ]
    flops = clip_flops(model, items[0]["wave"])

    # The machine may be shared: rates are given per wall second and per CPU second of this
    # process (what it got of the cores); the roofline is the best of measurements around the runs.
    peaks = [matmul_flops_per_s()]
    STAGE.process(model, items[:1], {})  # warm-up
    stage_s, stage_cpu = _timed(
        lambda: [STAGE.process(model, items[i : i + args.batch], {}) for i in range(0, len(items), args.batch)]
    )
    peaks.append(matmul_flops_per_s())
    loop_s, loop_cpu = _timed(lambda: one_at_a_time(model, items))
    peaks.append(matmul_flops_per_s())
    peak, peak_cpu = max(p for p, _ in peaks), max(c for _, c in peaks)

    print(
        f"BEATs {args.size}: {cfg['encoder_layers']} layers x {cfg['encoder_embed_dim']}, "
        f"{args.clips} clips of {args.seconds} s, fp32 CPU, {args.threads} threads"
    )
    print(f"FLOPs per {args.seconds} s clip (clip pass + {args.seconds} one-second passes): {flops / 1e9:.1f} GFLOP")
    print(
        f"matmul roofline (float32 2048^3 torch.mm, best of {len(peaks)}): {peak / 1e9:.1f} GFLOP/s per wall s, "
        f"{peak_cpu / 1e9:.1f} per CPU s; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'':36s} {'wall s':>7s} {'CPU s':>7s} {'clips/s':>8s} {'x realtime':>10s} "
        f"{'GFLOP/s':>8s} {'of matmul':>9s} {'per CPU s':>10s}"
    )
    for name, seconds, cpu in (
        (f"stage (process, batch {args.batch})", stage_s, stage_cpu),
        ("one clip at a time", loop_s, loop_cpu),
    ):
        rate, rate_cpu = flops * args.clips / seconds, flops * args.clips / cpu
        print(
            f"{name:36s} {seconds:7.2f} {cpu:7.2f} {args.clips / seconds:8.2f} {args.clips * args.seconds / seconds:10.1f} "
            f"{rate / 1e9:8.1f} {rate / peak:9.0%} {rate_cpu / peak_cpu:10.0%}"
        )
    print(f"speed-up of the stage over the loop: {loop_s / stage_s:.2f}x", flush=True)

    if args.runner_clips:
        from soundstage.manifests.synth import make_synthetic_dataset
        from soundstage.manifests.table import read_manifest
        from soundstage.pipeline.runner import run_stage

        manifest = make_synthetic_dataset(os.path.join(tmp, "data"), clips=args.runner_clips, seed=0, workers=0)
        summary = run_stage(
            STAGE,
            manifest,
            os.path.join(tmp, "cache"),
            {"checkpoint": path, "device": "cpu"},
            workers=1,
            batch_size=args.batch,
            progress=False,
            log=lambda *_: None,
        )
        assert summary.ok, summary.format()
        audio_s = float(read_manifest(manifest)["num_frames"].astype(int).sum())
        print(
            f"runner on the synthetic dataset: {args.runner_clips} clips, {audio_s:.0f} s of audio in "
            f"{summary.seconds:.1f} s ({audio_s / summary.seconds:.1f}x realtime; model load, decoding, "
            "mixed 5/10 s clip lengths and HDF5 commits included)"
        )


if __name__ == "__main__":
    main()
