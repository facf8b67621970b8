"""Test stages for the executor and SLURM tests (not shipped); both read ``audio-stats``.

``test-loudest`` (per clip) keeps each clip's loudest second; ``test-mean`` (whole dataset, so
SLURM runs it as one job, like a k-means fit) averages the loudness of all clips. Neither needs
a model, and their values are easy to check against the upstream output.
"""

import numpy as np

from soundstage.pipeline.stage import Field, Param, Stage, Upstream


def load_loudest(row, ctx):
    rms_db = np.asarray(ctx.upstream["stats"][row["clip_id"]]["rms_db"], dtype=np.float32)
    return {"second": int(np.argmax(rms_db)), "rms_db": float(rms_db.max()) + ctx.params["offset_db"]}


LOUDEST = Stage(
    name="test-loudest",
    version=1,
    help="The loudest second of each clip (test stage).",
    params=[Param("offset_db", float, 0.0, "added to the stored level")],
    upstream=[Upstream("stats", "audio-stats")],
    fields=[Field("second", "int32", ()), Field("rms_db", "float32", ())],
    load=load_loudest,
    process=lambda model, items, params: items,
    default_batch_size=4,
)


def fit_mean(ctx):
    stats = ctx.upstream["stats"]
    levels = [float(np.mean(stats[cid]["rms_db"])) for cid in ctx.clip_ids if cid in stats]
    return {"mean_rms_db": np.asarray([np.mean(levels)], dtype=np.float64), "clips": np.asarray([len(levels)])}


MEAN = Stage(
    name="test-mean",
    version=1,
    kind="global",
    help="Mean loudness over the dataset (test stage).",
    upstream=[Upstream("stats", "audio-stats")],
    fit=fit_mean,
)


def load_length(row, ctx):
    return {"chars": len(row["clip_id"])}


HUNGRY = Stage(
    name="test-hungry",
    version=1,
    help="The length of each clip id, asking by default for more than any test node has (test stage).",
    fields=[Field("chars", "int32", ())],
    load=load_length,
    process=lambda model, items, params: items,
    resources={"cpus": 64, "mem": "1T", "gpus": 1},
)


def register() -> None:
    """Make the test stages known to this process (``soundstage test-loudest``, ``test-mean``)."""
    from soundstage.stages import register_stage

    register_stage("test-loudest", f"{__name__}:LOUDEST")
    register_stage("test-mean", f"{__name__}:MEAN")
    register_stage("test-hungry", f"{__name__}:HUNGRY")
