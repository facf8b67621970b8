"""A whole-dataset stage for the executor and SLURM tests (not shipped): mean loudness of all clips.

Like k-means fitting it runs once over the dataset, so SLURM runs it as one job, not an array.
"""

import numpy as np

from soundstage.pipeline.stage import Stage, Upstream


def fit(ctx):
    stats = ctx.upstream["stats"]
    levels = [float(np.mean(stats[cid]["rms_db"])) for cid in ctx.clip_ids if cid in stats]
    return {"mean_rms_db": np.asarray([np.mean(levels)], dtype=np.float64), "clips": np.asarray([len(levels)])}


STAGE = Stage(
    name="test-mean",
    version=1,
    kind="global",
    help="Mean loudness over the dataset (test stage).",
    upstream=[Upstream("stats", "audio-stats")],
    fit=fit,
)
