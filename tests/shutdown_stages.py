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
    name="toy-wait", version=1,
    params=[Param("sleep", float, 0.0, fingerprint=False), Param("marker_dir", str, "", fingerprint=False)],
    fields=[Field("n", "int64", ())],
    load=load_wave, process=process_wait, default_batch_size=64,
)

def load_after(row, ctx):
    return {"n": int(ctx.upstream["wait"][row["clip_id"]]["n"])}


def as_results(model, items, params):
    return items


AFTER = Stage(
    name="toy-after", version=1,
    upstream=[Upstream("wait", "toy-wait")],
    fields=[Field("n", "int64", ())],
    load=load_after, process=as_results,
)
