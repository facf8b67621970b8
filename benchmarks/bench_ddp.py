"""DDP scaling efficiency of the training loop, side by side in one run.

The tiny audio-conditioned Mask2Former on the synthetic data, trained for a few steps with
``--batch-size B`` on 1 process and on N processes (gloo on CPU; NCCL with ``--device cuda`` when
there are N GPUs). The one-process run is timed twice: with transformers' own loss and with the
split-invariant loss that DDP runs use (``split_invariant_loss: true``), which separates the cost of
that loss (per-frame matching and point sampling) from the cost of communication. Weak scaling: each process keeps B clips per step, so N processes see N·B
clips per step. Step time is rank 0's median ``step_seconds`` (metrics/steps.jsonl: forward,
backward with the gradient all-reduce, optimizer step), the first step left out. The three runs are
repeated ``--repeats`` times, interleaved, and each figure is the median over the repeats (the
machine's load changes while it runs).

    efficiency = (clips/s on N processes) / (N x clips/s on 1 process)

    python benchmarks/bench_ddp.py [--nproc 2] [--batch-size 2] [--steps 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.models.tiny import build_vggish
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import resolve_config
from soundstage.train.launch import launch
from soundstage.train.loop import train


def step_seconds(run: str) -> float:
    with open(os.path.join(run, "metrics", "steps.jsonl")) as f:
        seconds = [json.loads(line)["step_seconds"] for line in f]
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="clips per process per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_synthetic_dataset(os.path.join(tmp, "data"), clips=args.clips, seed=0, workers=1)
        cache = os.path.join(tmp, "cache")
        checkpoint = build_vggish(os.path.join(tmp, "vggish.pth"))
        run_stage(
            get_stage("vggish"), manifest, cache, {"checkpoint": checkpoint}, workers=0, progress=False, log=lambda *_: None
        )
        settings = {
            "manifest": manifest,
            "cache": cache,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "epochs": 1,
            "probes": [],
            "threads": args.threads,
            "device": args.device,
        }
        times: dict[str, list] = {"one": [], "exact": [], "many": []}
        for repeat in range(args.repeats):
            one = os.path.join(tmp, f"one-{repeat}")
            train(resolve_config(None, {**settings, "out": one}), log=lambda *_: None, progress=False)
            exact = os.path.join(tmp, f"one-split-invariant-{repeat}")
            train(
                resolve_config(None, {**settings, "out": exact, "split_invariant_loss": True}),
                log=lambda *_: None,
                progress=False,
            )
            many = os.path.join(tmp, f"many-{repeat}")
            code = launch(resolve_config(None, {**settings, "out": many}), args.nproc, quiet=True, log=print)
            assert code == 0, f"the {args.nproc}-process run failed ({code})"
            for name, run in (("one", one), ("exact", exact), ("many", many)):
                times[name].append(step_seconds(run))
        t1, t1_exact, tn = (statistics.median(times[name]) for name in ("one", "exact", "many"))

    rate1, rate1_exact, rate_n = args.batch_size / t1, args.batch_size / t1_exact, args.nproc * args.batch_size / tn
    device = args.device if args.device != "cpu" else f"CPU, {os.cpu_count()} cores, {args.threads} thread(s) per process"
    print(
        f"device: {device}; torch {torch.__version__}; {args.steps} steps of {args.batch_size} clips per process; "
        f"median of {args.repeats} interleaved repeats"
    )
    print(f"{'processes':>9} {'loss':<16} {'step s':>8} {'clips/s':>8}")
    print(f"{1:>9} {'transformers':<16} {t1:>8.3f} {rate1:>8.2f}")
    print(f"{1:>9} {'split-invariant':<16} {t1_exact:>8.3f} {rate1_exact:>8.2f}")
    print(f"{args.nproc:>9} {'split-invariant':<16} {tn:>8.3f} {rate_n:>8.2f}")
    print(
        f"scaling efficiency on {args.nproc} processes: {rate_n / (args.nproc * rate1_exact):.0%} against the same loss "
        f"on 1 process, {rate_n / (args.nproc * rate1):.0%} against transformers' loss on 1 process"
    )


if __name__ == "__main__":
    main()
