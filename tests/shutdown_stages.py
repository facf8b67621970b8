"""Toy stages for the shutdown tests: ``toy-wait`` does all its clips in one batch (so a signal can
land in the last batch) and marks when a batch starts; ``toy-after`` reads it."""

import os
import time

from engine_stages import load_wave

from soundstage.pipeline.stage import Field, Param, Stage, Upstream


def process_wait(model, items, params):
    if params["marker_dir"]:
        open(os.path.join(params["marker_dir"], f"start-{time.monotonic_ns()}"), "w").close()
    time.sleep(params["sleep"] * len(items))
    return [{"n": len(it["wave"])} for it in items]


WAIT = Stage(
    name="toy-wait",
    version=1,
    params=[Param("sleep", float, 0.0, fingerprint=False), Param("marker_dir", str, "", fingerprint=False)],
    fields=[Field("n", "int64", ())],
    load=load_wave,
    process=process_wait,
    default_batch_size=64,
)


def load_after(row, ctx):
    return {"n": int(ctx.upstream["wait"][row["clip_id"]]["n"])}


def as_results(model, items, params):
    return items


AFTER = Stage(
    name="toy-after",
    version=1,
    upstream=[Upstream("wait", "toy-wait")],
    fields=[Field("n", "int64", ())],
    load=load_after,
    process=as_results,
)


def process_dies_on_long(model, items, params):
    """Stands in for a model that the kernel kills (out of memory) on a long clip."""
    if params["die_on_long"] and any(len(it["wave"]) > 16000 * 1.5 for it in items):
        os.kill(os.getpid(), 9)
    if params["marker_dir"]:
        for it in items:
            open(os.path.join(params["marker_dir"], f"{len(it['wave'])}-{time.monotonic_ns()}"), "w").close()
    return [{"n": len(it["wave"])} for it in items]


def long_wave(item) -> bool:
    return len(item["wave"]) > 16000 * 1.5


FRAGILE_ON_LONG = Stage(
    name="toy-fragile-long",
    version=1,
    params=[Param("die_on_long", bool, False, fingerprint=False, is_flag=True), Param("marker_dir", str, "", fingerprint=False)],
    fields=[Field("n", "int64", ())],
    load=load_wave,
    process=process_dies_on_long,
    risky=long_wave,
    default_batch_size=64,
)


def load_slowly(row, ctx):
    """A decoding worker that is busy when the stop comes (a long clip being decoded)."""
    time.sleep(ctx.params["load_sleep"])
    return load_wave(row, ctx)


SLOW_LOAD = Stage(
    name="toy-slow-load",
    version=1,
    params=[
        Param("load_sleep", float, 0.0, fingerprint=False),
        Param("sleep", float, 0.0, fingerprint=False),
        Param("marker_dir", str, "", fingerprint=False),
    ],
    fields=[Field("n", "int64", ())],
    load=load_slowly,
    process=process_wait,
    default_batch_size=1,
)
