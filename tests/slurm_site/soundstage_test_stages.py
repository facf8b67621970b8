"""Test stages for the executor and SLURM tests (not shipped): a cheap stage reading another.

``loudest`` reads ``audio-stats`` and keeps each clip's loudest second, so a two-stage pipeline
needs no model and its expected values are easy to compute from the upstream output.
"""

import numpy as np

from soundstage.pipeline.stage import Field, Param, Stage, Upstream


def load(row, ctx):
    rms_db = np.asarray(ctx.upstream["stats"][row["clip_id"]]["rms_db"], dtype=np.float32)
    return {"second": int(np.argmax(rms_db)), "rms_db": float(rms_db.max()) + ctx.params["offset_db"]}


LOUDEST = Stage(
    name="test-loudest",
    version=1,
    help="The loudest second of each clip (test stage).",
    params=[Param("offset_db", float, 0.0, "added to the stored level")],
    upstream=[Upstream("stats", "audio-stats")],
    fields=[Field("second", "int32", ()), Field("rms_db", "float32", ())],
    load=load,
    process=lambda model, items, params: items,
    default_batch_size=4,
)
STAGE = LOUDEST


def register() -> None:
    """Make the test stages known to this process (``soundstage test-loudest``, ``test-mean``)."""
    from soundstage.stages import register_stage

    register_stage("test-loudest", __name__)
    register_stage("test-mean", "soundstage_test_global")
