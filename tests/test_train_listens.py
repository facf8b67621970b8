"""On the synthetic data, where visible objects are often silent, a trained model must listen:
its score with the real audio cue must beat its score with the cue of digital silence by a clear
margin. The demo's settings, shortened (fixed seeds: the numbers are reproducible).

The slowest training test (about half a minute of CPU): 24 clips, one clip a step as the demo
trains (two clips a step for 12 epochs, 144 steps, was too few for the tiny model to use the cue
once the VGGish cue was resampled as the reference does), 40 epochs, one evaluation at the end.
Whether the tiny model learns to listen still depends on the seed (docs/training.md, the demo).
"""

from __future__ import annotations

import os

from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.models.tiny import build_vggish
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import resolve_config
from soundstage.train.loop import train


def test_the_trained_model_beats_its_muted_score(tmp_path):
    manifest = make_synthetic_dataset(str(tmp_path / "data"), clips=24, seed=0, workers=1)
    checkpoint = build_vggish(str(tmp_path / "vggish.pth"))
    cache = str(tmp_path / "cache")
    run_stage(get_stage("vggish"), manifest, cache, {"checkpoint": checkpoint}, workers=0, progress=False, log=lambda *_: None)
    cfg = resolve_config(
        None,
        {
            "manifest": manifest,
            "cache": cache,
            "out": str(tmp_path / "run"),
            "epochs": 40,
            "batch_size": 1,
            "lr": 1e-3,
            "warmup_steps": 5,
            "threads": 1,
            "eval_every": 40,
            "probes": ["muted", "zeroed"],
            "seed": 0,
        },
    )
    record = train(cfg, log=lambda *_: None, progress=False)
    real, muted, zeroed = (record["eval"][v]["miou"] for v in ("real", "muted", "zeroed"))
    assert real > 0.25, record["eval"]
    assert real - muted > 0.1 and real - zeroed > 0.1, record["eval"]
    assert os.path.exists(tmp_path / "run" / "curves.png")
