"""k-means: faiss (soundstage's settings) against sklearn MiniBatchKMeans with fairseq's settings.

Both fit the same frames; inertia is measured the same way (mean squared distance to the nearest
centroid, float64) on all of them. Goal: faiss >= 10x faster at <= 1% worse inertia.

Data: synthetic clustered frames of HuBERT width (768): ``--sources`` Gaussian sources with
random centres and per-source scales, so the data has structure at many scales without being
K well-separated blobs (which would flatter any method).

    python benchmarks/bench_kmeans.py --frames 200000 --ks 100 500 [--threads 1]

Extra faiss configurations to compare: ``--faiss niter=10,max_points_per_centroid=256 ...``.
"""

import argparse
import os
import platform
import time

import numpy as np


def synthetic_frames(n: int, dim: int, sources: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((sources, dim)).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, sources).astype(np.float32)
    which = rng.integers(0, sources, n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= scales[which, None]
    x += centres[which]
    return x


def parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = value if key == "init" else int(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--sources", type=int, default=2000)
    ap.add_argument("--ks", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="BLAS/OpenMP threads (0: library default)")
    ap.add_argument("--faiss", nargs="*", default=[], help="extra faiss settings to try, key=value,...")
    args = ap.parse_args()
    if args.threads:  # before numpy/faiss start their thread pools
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import faiss
    import sklearn

    from soundstage.models.kmeans import FAISS_SETTINGS, fit_kmeans, inertia_per_frame

    x = synthetic_frames(args.frames, args.dim, args.sources, args.seed)
    print(
        f"# {args.frames} synthetic frames x {args.dim} ({args.sources} Gaussian sources); "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, faiss {faiss.__version__} "
        f"({'GPU' if faiss.get_num_gpus() else 'CPU'}), sklearn {sklearn.__version__}, "
        f"threads {args.threads or 'default'}"
    )
    print(f"# faiss settings: {FAISS_SETTINGS}")
    configs = [{}] + [parse_config(c) for c in args.faiss]
    rows = []

    def timed(fn):  # wall and CPU seconds: on a shared machine CPU time of a 1-thread run is the steadier
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    for k in args.ks:
        c_sk, w_sk, t_sk = timed(lambda: fit_kmeans(x, k, backend="sklearn", seed=args.seed))
        i_sk = inertia_per_frame(x, c_sk)
        print(f"# K={k} sklearn wall {w_sk:.1f} s cpu {t_sk:.1f} s inertia {i_sk:.3f}", flush=True)
        for config in configs:
            c_f, w_f, t_f = timed(lambda: fit_kmeans(x, k, backend="faiss", seed=args.seed, device="cpu", **config))
            i_f = inertia_per_frame(x, c_f)
            name = ",".join(f"{a}={b}" for a, b in config.items()) or "default"
            rows.append((k, name, w_sk, t_sk, w_f, t_f, i_sk, i_f))
            print(f"# K={k} faiss {name} wall {w_f:.1f} s cpu {t_f:.1f} s inertia {i_f:.3f}", flush=True)
    print()
    print(
        "| K | faiss settings | sklearn (fairseq) wall / cpu s | faiss wall / cpu s | speed-up wall / cpu "
        "| sklearn inertia/frame | faiss inertia/frame | inertia faiss/sklearn |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k, name, w_sk, t_sk, w_f, t_f, i_sk, i_f in rows:
        print(
            f"| {k} | {name} | {w_sk:.1f} / {t_sk:.1f} | {w_f:.1f} / {t_f:.1f} | {w_sk / w_f:.1f}x / {t_sk / t_f:.1f}x "
            f"| {i_sk:.3f} | {i_f:.3f} | {i_f / i_sk:.4f} |"
        )


if __name__ == "__main__":
    main()
