"""Timing: generating the synthetic dataset and building (checking) AVSBench manifests.

    python benchmarks/bench_manifest.py [--out benchmarks/out/manifest] [--copies 20]

Builds the 100-clip synthetic dataset, then a 2,000-clip copy of it (``--copies`` x 100 clips,
files hard-linked under new uids, so it costs no disk), and times the manifest build with
1 / 4 / 16 threads, header checks and full decoding. The files are in the page cache (just
written or linked): these are warm-cache numbers; a cold network file system is slower and
gains more from threads.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time

from soundstage.manifests.avsbench import build_avsbench_manifest
from soundstage.manifests.synth import make_synthetic_dataset


def replicate(src: str, dst: str, copies: int) -> int:
    """``copies`` x the clips of ``src`` under new uids (``<uid>-c<k>``), files hard-linked."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "label2idx.json"), dst)
    with open(os.path.join(src, "metadata.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    out_rows = []
    for k in range(copies):
        for row in rows:
            uid = f"{row['uid']}-c{k}"
            shutil.copytree(
                os.path.join(src, row["label"], row["uid"]), os.path.join(dst, row["label"], uid), copy_function=os.link
            )
            out_rows.append({**row, "uid": uid})
    with open(os.path.join(dst, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    return len(out_rows)


def timed(label: str, fn):
    started = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - started
    print(f"{label:<52}{seconds:8.2f} s", flush=True)
    return value, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/manifest")
    parser.add_argument("--copies", type=int, default=20)
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    synth = os.path.join(args.out, "synth100")
    timed("generate synthetic dataset, 100 clips", lambda: make_synthetic_dataset(synth, clips=100, seed=0))
    for workers in (1, 16):
        result, seconds = timed(
            f"manifest of 100 clips, {workers} threads", lambda: build_avsbench_manifest(synth, workers=workers)
        )
    files = (
        sum(
            len(os.listdir(os.path.join(root, d)))
            for root, dirs, _ in os.walk(synth)
            for d in dirs
            if d in ("frames", "labels_rgb", "labels_semantic")
        )
        + 100
    )
    print(f"  ({files} files, {len(result.manifest)} clips)")

    big = os.path.join(args.out, "copy2000")
    n, _ = timed(f"hard-linked copy, {args.copies} x 100 clips", lambda: replicate(synth, big, args.copies))
    for workers, decode in ((1, False), (4, False), (16, False), (16, True)):
        label = f"manifest of {n} clips, {workers} threads" + (", full decode" if decode else "")
        result, seconds = timed(label, lambda: build_avsbench_manifest(big, workers=workers, decode=decode))
        print(f"  {n / seconds:,.0f} clips/s, problems: {(result.manifest['problem'] != '').sum()}")


if __name__ == "__main__":
    main()
