"""hubert stage throughput against the reference per-file loop, on the same model and clips.

Reference (what ``dump_hubert_feature.py`` does): for each file, read it, resample to 16 kHz,
one forward of one clip (``no_grad``, stopping at the requested layer, as fairseq's
``output_layer`` does). Stage: the real runner — decoding in worker processes, equal-length
clips batched, ``inference_mode``.

Both timings include loading the model; the stage's also includes starting its worker processes.
Also reported: achieved FLOP/s of the stage (FLOPs of one forward counted by
``torch.utils.flop_counter``) as a fraction of the machine's measured fp32 matmul FLOP/s.

Model: HuBERT-base shape (12 layers, 768 wide, 3072 FFN, real conv stack), random weights,
saved and loaded through the normal path. Clips: the synthetic AVSBench dataset (5 s and 10 s,
16 / 44.1 / 48 kHz).

    python benchmarks/bench_hubert.py --clips 20 --layer 9 [--tiny] [--device cuda]
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
from torch.nn.utils import parametrize


def matmul_flops(device: str, n: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def forward_flops(extractor, lengths, layer: int) -> dict:
    """FLOPs of one forward of one clip, per clip length in samples."""
    from torch.utils.flop_counter import FlopCounterMode

    # the counter cannot see through the weight-norm parametrization of the positional conv:
    # count on a copy with the weight folded in (same arithmetic). Removing it changes the
    # parametrized class, which the copy shares with the original: so the original is not used after.
    extractor = copy.deepcopy(extractor)
    conv = extractor.model.encoder.pos_conv_embed.conv
    if parametrize.is_parametrized(conv):
        parametrize.remove_parametrizations(conv, "weight")
    out = {}
    for n in lengths:
        counter = FlopCounterMode(display=False)
        with counter:
            extractor.extract_batch(np.zeros((1, n), np.float32), layer)
        out[n] = counter.get_total_flops()
    return out


def main():
    from transformers import HubertConfig, HubertModel

    from soundstage.audio import load_audio
    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.manifests.table import read_manifest, resolve_path
    from soundstage.models.hubert import load_hubert
    from soundstage.models.tiny import tiny_hubert_config
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="a small model instead of the base shape")
    args = ap.parse_args()

    peaks = [matmul_flops(args.device)]  # the machine may be shared: measured before and after, the best kept
    work = tempfile.mkdtemp(prefix="bench_hubert_")
    manifest = make_synthetic_dataset(os.path.join(work, "synth"), clips=args.clips, seed=0, workers=1)
    torch.manual_seed(0)
    config = tiny_hubert_config(num_hidden_layers=args.layer) if args.tiny else HubertConfig()  # HF default = base
    HubertModel(config).save_pretrained(os.path.join(work, "model"))
    model_dir = os.path.join(work, "model")
    rows = read_manifest(manifest).to_dict("records")
    paths = [resolve_path(r["audio_path"], os.path.dirname(manifest)) for r in rows]
    durations = [load_audio(p).wave.shape[0] for p in paths]
    audio_seconds = sum(durations) / 16000
    print(
        f"# {len(paths)} clips, {audio_seconds:.0f} s of audio ({sorted(set(d // 16000 for d in durations))} s long); "
        f"model {'tiny' if args.tiny else 'base-shape'} ({config.num_hidden_layers} layers x {config.hidden_size}), "
        f"layer {args.layer}, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
    )

    # reference: the per-file loop of dump_hubert_feature.py (model loading included, as in the stage)
    start = time.perf_counter()
    extractor = load_hubert(model_dir, device=args.device, dtype=args.dtype)
    with torch.no_grad():
        for p in paths:
            extractor.extract(load_audio(p).wave, args.layer)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ref = time.perf_counter() - start

    # the stage, through the runner
    params = {"model": model_dir, "layer": args.layer, "device": args.device, "dtype": args.dtype}
    start = time.perf_counter()
    summary = run_stage(
        get_stage("hubert"),
        manifest,
        os.path.join(work, "cache"),
        params,
        workers=args.workers,
        batch_size=args.batch_size,
        progress=False,
        log=lambda *_: None,
    )
    t_stage = time.perf_counter() - start
    assert summary.ok and summary.done == len(paths), summary.format()

    per_length = forward_flops(extractor, sorted(set(durations)), args.layer)
    flops = sum(per_length[n] for n in durations)
    peaks.append(matmul_flops(args.device))
    peak = max(peaks)

    print()
    print("| run | wall s | clips/s | audio s per s | achieved GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|---|")
    for name, t in (
        ("reference per-file loop (dump_hubert_feature)", t_ref),
        (f"hubert stage (batch {args.batch_size}, {args.workers} workers)", t_stage),
    ):
        print(
            f"| {name} | {t:.1f} | {len(paths) / t:.2f} | {audio_seconds / t:.1f} | {flops / t / 1e9:.1f} | "
            f"{flops / t / peak:.2f} |"
        )
    print(
        f"\nspeed-up of the stage: {t_ref / t_stage:.2f}x; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (before/after: {peaks[0] / 1e9:.1f}/{peaks[1] / 1e9:.1f}); "
        f"{flops / len(paths) / 1e9:.1f} GFLOP per clip (forward to layer {args.layer})"
    )


if __name__ == "__main__":
    main()
