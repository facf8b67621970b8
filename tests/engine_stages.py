"""Toy stages for the engine tests (registered by the tests, not shipped as stages)."""

import os
import time

import numpy as np

from soundstage.audio import load_audio
from soundstage.manifests.table import resolve_path
from soundstage.pipeline.stage import ClipError, Field, Param, Stage, Upstream


def load_wave(row, ctx):
    return {"wave": load_audio(resolve_path(row["audio_path"], ctx.manifest_dir)).wave}


def process_slow(model, items, params):
    time.sleep(params["sleep"] * len(items))
    if params["marker_dir"]:  # lets a test see progress without waiting for a commit
        open(os.path.join(params["marker_dir"], f"batch-{time.monotonic_ns()}"), "w").close()
    out = []
    for it in items:
        w = it["wave"]
        frames = w[: len(w) // 320 * 320].reshape(-1, 320)
        energy = (frames**2).mean(axis=1) * params["scale"]
        out.append(
            {
                "energy": energy,
                "peak": float(np.abs(w).max()),
                "label": f"n={len(w)}",
                "pairs": energy[: len(energy) // 2 * 2].reshape(-1, 2),
            }
        )
    return out


SLOW = Stage(
    name="toy-slow",
    version=1,
    params=[
        Param("scale", float, 1.0),
        Param("sleep", float, 0.0, fingerprint=False),
        Param("marker_dir", str, "", fingerprint=False),
    ],
    fields=[
        Field("energy", "float16", (None,)),
        Field("peak", "float32", ()),
        Field("label", "str", ()),
        Field("pairs", "float32", (None, None)),
    ],  # second axis: fixed at run time
    load=load_wave,
    process=process_slow,
    warn=lambda v: "loud" if v["peak"] > 0.12 else None,
    batch_key=lambda it: len(it["wave"]),
    default_batch_size=2,
)


def load_sum(row, ctx):
    stats = ctx.upstream["stats"][row["clip_id"]]
    if ctx.params["fail_on"] and row["clip_id"] == ctx.params["fail_on"]:
        raise ClipError("asked to fail")
    return {"total": float(np.sum(stats["rms_db"]))}


SUM = Stage(
    name="toy-sum",
    version=1,
    params=[Param("fail_on", str, "")],
    upstream=[Upstream("stats", "audio-stats")],
    fields=[Field("total", "float64", ())],
    load=load_sum,
    process=lambda model, items, params: items,
)


def process_breaks_on_long(model, items, params):
    if any(len(it["wave"]) > 16000 * 6 for it in items):
        raise RuntimeError("model exploded")
    return [{"n": len(it["wave"])} for it in items]


FRAGILE = Stage(
    name="toy-fragile",
    version=1,
    fields=[Field("n", "int64", ())],
    load=load_wave,
    process=process_breaks_on_long,
    default_batch_size=4,
)


def fit_mean(ctx):
    stats = ctx.upstream["stats"]
    values = np.concatenate([stats[cid]["rms_db"] for cid in ctx.clip_ids if cid in stats])
    return {"mean_db": np.array([values.mean()]), "clips": np.array([len(ctx.clip_ids)])}


MEAN = Stage(
    name="toy-mean",
    version=1,
    kind="global",
    upstream=[Upstream("stats", "audio-stats")],
    fit=fit_mean,
)
