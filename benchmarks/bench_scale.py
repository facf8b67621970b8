"""What grows with the dataset: random reads over many parts, an array task's start-up, --jobs,
tiny parts, and the k-means sample.

Synthetic manifests (24 columns), a cheap stage, real part files. Every figure is a side-by-side
ratio measured in one run; start-up figures come from fresh processes (time, CPU, peak RSS).

    python benchmarks/bench_scale.py --clips 100000 [--reads 40000] [--dir /tmp/bench_scale]
    python benchmarks/bench_scale.py --clips 200000
    python benchmarks/bench_scale.py --only reads,startup,jobs,tiny,kmeans

1. reads: the same clips written as parts of 256 clips (the default commit size) and as one part;
   random order; plain loop (a fresh reader's first pass, then a second) and a 2-worker torch
   DataLoader (epochs 1 and 2).
2. startup: all-cached ``run_stage`` for shard 0/100 vs the whole manifest (fresh processes): the
   task as submitted (its rows from the planner's task plan) and reading the manifest itself.
3. jobs: CPU time of an all-cached run with ``--jobs 4`` vs ``--jobs 1`` (all processes counted).
4. tiny: a slow stage's parts (8 clips each): opening the output before and after its writer
   merged them, with the clip index cold (first open) and warm.
5. kmeans: peak memory of reading a 10% sample of HuBERT-size features, one preallocated array
   (``read_sample``) vs a list of float32 copies and a concatenate, against the sample's size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from soundstage.cache import StageDir, open_stage
from soundstage.cache.index import INDEX_FILE
from soundstage.cache.maintenance import merge_shard_parts
from soundstage.pipeline.stage import Field, Stage

FIELDS = [Field("feat", "float16", (None, 16)), Field("label", "str")]
HERE = os.path.dirname(os.path.abspath(__file__))


def clip_values(k: int) -> dict:
    return {"feat": np.full((4 + k % 9, 16), k % 1000, np.float16), "label": f"class {k % 309}"}


def load_row(row, ctx):  # the cheap stage: its values come from the manifest row
    return clip_values(int(row["value"]))


CHEAP = Stage("cheap", 1, fields=FIELDS, load=load_row, reads=("value",))


def write_output(path: str, n: int, per_part: int) -> StageDir:
    shutil.rmtree(path, ignore_errors=True)
    sd = StageDir(path)
    meta = {
        "stage": "bench",
        "version": 1,
        "fingerprint": os.path.basename(path),
        "kind": "per_clip",
        "fields": [{"name": f.name, "dtype": f.dtype, "shape": list(f.shape)} for f in FIELDS],
    }
    sd.initialise(meta)
    for seq, start in enumerate(range(0, n, per_part)):
        rows = [(f"clip{k:07d}", clip_values(k)) for k in range(start, min(n, start + per_part))]
        sd.write_part("w", seq, FIELDS, rows, meta, digests=[""] * len(rows))
    return sd


def write_manifest(path: str, n: int) -> None:
    import pandas as pd

    columns = {"clip_id": [f"clip{k:07d}" for k in range(n)], "value": [str(k) for k in range(n)]}
    for j in range(22):  # the other columns of a real manifest (paths, labels, splits, ...)
        columns[f"col{j:02d}"] = [f"some/value/{j}/{k % 997}" for k in range(n)]
    pd.DataFrame(columns).to_csv(path, index=False)


# --------------------------------------------------------------------------------- 1. reads


class ReaderDataset:
    """A map-style dataset over a stage output (what a training run does)."""

    def __init__(self, path, ids):
        self.reader, self.ids = open_stage(path), ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = self.reader[self.ids[i]]
        return item["feat"].shape[0] + len(item["label"])


def plain_rates(path, order) -> tuple[float, float, float]:
    """clips/s of a fresh reader's first pass (each part touched for the first time in this
    process), of its second pass over the same clips, and of the first pass in CPU time."""
    reader = open_stage(path)
    t, cpu = time.perf_counter(), time.process_time()
    for cid in order:
        reader[cid]
    first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    for cid in order:
        reader[cid]
    return len(order) / first, len(order) / (time.perf_counter() - t), len(order) / first_cpu


def loader_rates(path, order) -> tuple[float, float]:
    """clips/s of epochs 1 and 2 through a 2-worker DataLoader (persistent workers)."""
    import torch.utils.data

    loader = torch.utils.data.DataLoader(
        ReaderDataset(path, order), batch_size=64, num_workers=2, collate_fn=lambda b: sum(b), persistent_workers=True
    )
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        assert sum(loader) > 0
        rates.append(len(order) / (time.perf_counter() - t))
    return tuple(rates)


def bench_reads(root, n, reads, repeat=5):
    many = write_output(os.path.join(root, "reads", "many"), n, 256)
    one = write_output(os.path.join(root, "reads", "one"), n, n)
    parts_many, parts_one = len(many.part_paths()), len(one.part_paths())
    for sd in (many, one):
        open_stage(sd.path)  # writes the clip index
    gc.collect()
    os.sync()  # written data flushed before reading: writeback must not land in one side's timing
    time.sleep(5)
    order = [f"clip{k:07d}" for k in random.Random(0).sample(range(n), min(reads, n))]
    print(
        f"\n1. random reads, {n} clips ({len(order)} reads, random order; fields: float16 [4-12, 16], str): "
        f"{parts_many} parts vs {parts_one}; best of {repeat}, many and one interleaved"
    )
    print(f"{'':34}{'many parts':>14}{'one part':>14}{'many/one':>10}")
    rows = (
        ("plain loop, first pass", plain_rates, 0),
        ("plain loop, second pass", plain_rates, 1),
        ("plain loop, first pass (CPU)", plain_rates, 2),
        ("DataLoader x2, epoch 1", loader_rates, 0),
        ("DataLoader x2, epoch 2", loader_rates, 1),
    )
    best = {}
    for fn in (plain_rates, loader_rates):
        for _ in range(repeat):  # interleaved: a load spike on this shared machine hits both
            for label, sd in (("many", many), ("one", one)):
                rates = fn(sd.path, order)
                old = best.get((fn, label), (0,) * len(rates))
                best[fn, label] = tuple(max(a, b) for a, b in zip(old, rates))
    for name, fn, k in rows:
        m, o = best[fn, "many"][k], best[fn, "one"][k]
        print(f"{name:34}{m:>11.0f} /s{o:>11.0f} /s{m / o:>10.2f}")


# ----------------------------------------------------------------------- 2./3. startup, jobs


CHILD = """
import json, os, sys, time
sys.path.insert(0, {here!r})
t0, c0 = time.perf_counter(), time.process_time()
from bench_scale import CHEAP
from soundstage.pipeline.local import run_local
if {trace}:  # Python and numpy allocations of the run itself (imports before this are not counted)
    import tracemalloc
    tracemalloc.start()
summary = run_local(CHEAP, {manifest!r}, {cache!r}, {{}}, shard={shard!r}, jobs={jobs}, task_plan={plan!r}, progress=False, log=lambda *a: None)
assert not summary.notes, summary.notes  # a plan that was not used says so
cpu = time.process_time() - c0
if {jobs} > 1:  # the shard processes are children of multiprocessing's fork server: count them there
    from multiprocessing import forkserver
    pid = forkserver._forkserver._forkserver_pid  # None: no shard needed a process
    if pid is not None:
        stat = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()
        cpu += sum(int(x) for x in stat[11:15]) / os.sysconf("SC_CLK_TCK")
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
traced = tracemalloc.get_traced_memory()[1] / 2**20 if {trace} else None
print(json.dumps({{"traced_mb": traced, "path": summary.path, "seconds": time.perf_counter() - t0, "cpu": cpu, "rss_mb": int(hwm) / 1024, "pandas": "pandas" in sys.modules,
                  "selected": summary.selected, "cached": summary.cached, "done": summary.done}}))
"""

IMPORTS_ONLY = """
import json, sys
sys.path.insert(0, {here!r})
from bench_scale import CHEAP
from soundstage.pipeline.local import run_local
if {pandas}:
    import pandas  # what reading a manifest needs: a fixed cost, not the share's
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"rss_mb": int(hwm) / 1024}}))
"""


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(manifest, cache, shard="0/1", jobs=1, plan=None, trace=False) -> dict:
    return child(CHILD.format(here=HERE, manifest=manifest, cache=cache, shard=shard, jobs=jobs, plan=plan, trace=trace))


def measured(manifest, cache, **how) -> dict:
    """The faster of two runs (time, CPU, peak RSS), and a third traced run's allocation peak."""
    best = min((run_child(manifest, cache, **how) for _ in range(2)), key=lambda r: r["seconds"])
    return {**best, "traced_mb": run_child(manifest, cache, trace=True, **how)["traced_mb"]}


def prepare_run(root, n):
    manifest, cache = os.path.join(root, "run", "manifest.csv"), os.path.join(root, "run", "cache")
    shutil.rmtree(os.path.join(root, "run"), ignore_errors=True)
    os.makedirs(cache)
    write_manifest(manifest, n)
    first = run_child(manifest, cache)  # computes every clip (and merges its parts)
    assert first["done"] == n, first
    return manifest, cache, first


def bench_startup(root, n, manifest, cache, first):
    from soundstage.pipeline.runner import manifest_rows
    from soundstage.pipeline.task_plan import manifest_stamp, write_task_plans

    base = {p: child(IMPORTS_ONLY.format(here=HERE, pandas=p))["rss_mb"] for p in (False, True)}
    output = StageDir(first["path"])
    read = (manifest_stamp(manifest), *manifest_rows(manifest))  # the planner has read the manifest anyway
    t = time.perf_counter()
    plans = write_task_plans(output.path, manifest, CHEAP, 100, list(range(100)), read=read)  # what it adds at submission
    planning = time.perf_counter() - t
    full = measured(manifest, cache)
    read = measured(manifest, cache, shard="0/100")
    task = measured(manifest, cache, shard="0/100", plan=plans)
    assert full["cached"] == n and task["cached"] == task["selected"] == read["selected"], (full, task, read)
    print(f"\n2. all-cached start-up, {n} clips, 24-column manifest (first run computing all: {first['seconds']:.1f} s)")
    print(f"   imports alone: engine {base[False]:.0f} MB, engine + pandas {base[True]:.0f} MB")
    print(f"{'':34}{'clips':>8}{'time':>9}{'CPU':>9}{'peak RSS':>10}{'above imports':>15}{'allocated':>11}")
    rows = {"whole manifest": full, "task 0/100 reading the manifest": read, "task 0/100 with its plan": task}
    above = {name: r["rss_mb"] - base[r["pandas"]] for name, r in rows.items()}
    for name, r in rows.items():
        print(
            f"{name:34}{r['selected']:>8}{r['seconds']:>7.2f} s{r['cpu']:>7.2f} s{r['rss_mb']:>7.0f} MB"
            f"{above[name]:>12.1f} MB{r['traced_mb']:>8.1f} MB" + ("" if r["pandas"] else "  (no pandas)")
        )
    for name in list(rows)[1:]:
        r = rows[name]
        print(
            f"{name} / whole: time {r['seconds'] / full['seconds']:.3f}, memory above imports "
            f"{above[name] / max(above['whole manifest'], 1):.3f}, allocated {r['traced_mb'] / full['traced_mb']:.3f} "
            f"(its share of the clips: {r['selected'] / n:.3f})"
        )
    print(f"the planner writing all 100 task plans at submission: {planning:.2f} s")


def bench_jobs(n, manifest, cache):
    runs = {1: [], 4: []}
    for _ in range(4):  # interleaved, best of 4: a load spike on this shared machine hits both
        for jobs in runs:
            runs[jobs].append(run_child(manifest, cache, jobs=jobs))
    one, four = (min(runs[jobs], key=lambda r: r["cpu"]) for jobs in (1, 4))
    assert four["cached"] == n, four
    print(f"\n3. all-cached run, {n} clips: CPU time of every process (best of 4, interleaved)")
    print(f"--jobs 1: {one['cpu']:.2f} s CPU ({one['seconds']:.2f} s wall)")
    print(f"--jobs 4: {four['cpu']:.2f} s CPU ({four['seconds']:.2f} s wall)   jobs4/jobs1 CPU {four['cpu'] / one['cpu']:.2f}")


# ---------------------------------------------------------------------------------- 4. tiny


def timed_open(path) -> float:
    t = time.perf_counter()
    reader = open_stage(path)
    len(reader)
    return time.perf_counter() - t


def bench_tiny(root, n):
    sd = write_output(os.path.join(root, "tiny", "out"), n, 8)  # a slow stage committing every 120 s
    before = len(sd.part_paths())
    cold = timed_open(sd.path)
    warm = min(timed_open(sd.path) for _ in range(3))
    t = time.perf_counter()
    merged = merge_shard_parts(sd, "w", "w-merged")
    merge_s = time.perf_counter() - t
    after = len(sd.part_paths())
    os.remove(os.path.join(sd.path, INDEX_FILE))
    cold_after = timed_open(sd.path)
    warm_after = min(timed_open(sd.path) for _ in range(3))
    print(f"\n4. tiny parts: {n} clips in {before} parts of 8 -> merged into {after} ({merged} fewer) in {merge_s:.1f} s")
    print(
        f"open_stage, index cold: {cold:.2f} s before, {cold_after:.2f} s after; index warm: {warm:.3f} s before, "
        f"{warm_after:.3f} s after"
    )


# -------------------------------------------------------------------------------- 5. kmeans


def bench_kmeans(root, clips, frames):
    from soundstage.models.kmeans import sample_clip_ids
    from soundstage.stages.kmeans import read_sample

    fields = [Field("features", "float16", (None, 768))]
    sd = StageDir(os.path.join(root, "kmeans", "hubert"))
    shutil.rmtree(sd.path, ignore_errors=True)
    meta = {
        "stage": "hubert",
        "version": 1,
        "fingerprint": "x",
        "kind": "per_clip",
        "fields": [{"name": "features", "dtype": "float16", "shape": [None, 768]}],
    }
    sd.initialise(meta)
    rng = np.random.default_rng(0)
    for seq, start in enumerate(range(0, clips, 64)):
        rows = [
            (f"c{k:06d}", {"features": rng.standard_normal((frames + k % 7, 768)).astype(np.float16)})
            for k in range(start, min(clips, start + 64))
        ]
        sd.write_part("w", seq, fields, rows, meta)
    reader = open_stage(sd.path)
    sample = sample_clip_ids(list(reader), 0.1, 0)

    def concatenated():
        return np.concatenate([np.asarray(reader[cid]["features"], dtype=np.float32) for cid in sample])

    results = {}
    for name, fn in (("list + concatenate", concatenated), ("one array (read_sample)", lambda: read_sample(reader, sample))):
        tracemalloc.start()
        t = time.perf_counter()
        x = fn()
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[name] = (peak, seconds, x.nbytes)
        del x
    size = results["list + concatenate"][2]
    print(f"\n5. k-means sample: {len(sample)} of {clips} clips, {size / 2**20:.0f} MiB as float32")
    for name, (peak, seconds, _) in results.items():
        print(f"{name:26} peak {peak / 2**20:8.0f} MiB = {peak / size:.2f}x the sample   {seconds:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--reads", type=int, default=40_000)
    ap.add_argument("--repeat", type=int, default=5, help="reads: best of this many (the machine may be shared)")
    ap.add_argument("--tiny-clips", type=int, default=20_000)
    ap.add_argument("--kmeans-clips", type=int, default=2_000)
    ap.add_argument("--kmeans-frames", type=int, default=250)
    ap.add_argument("--dir", default="/tmp/bench_scale")
    ap.add_argument("--only", default="reads,startup,jobs,tiny,kmeans")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    os.makedirs(args.dir, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if "reads" in parts:
        bench_reads(args.dir, args.clips, args.reads, args.repeat)
    if parts & {"startup", "jobs"}:
        manifest, cache, first = prepare_run(args.dir, args.clips)
        if "startup" in parts:
            bench_startup(args.dir, args.clips, manifest, cache, first)
        if "jobs" in parts:
            bench_jobs(args.clips, manifest, cache)
    if "tiny" in parts:
        bench_tiny(args.dir, args.tiny_clips)
    if "kmeans" in parts:
        bench_kmeans(args.dir, args.kmeans_clips, args.kmeans_frames)
    print(
        f"\nload average {os.getloadavg()[0]:.1f}; peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
