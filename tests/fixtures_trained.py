"""A tiny trained binary run on the synthetic dataset, made once per session, for the tests of
what consumes runs (masks stage, report, the mask prior).

``trained_run`` gives a dict: ``manifest`` (the synthetic manifest with absolute paths), ``cache``
(holding the tiny VGGish's output), ``run`` (a finished 2-step binary run), ``root``.
"""

from __future__ import annotations

import os

import pandas as pd
import pytest
from fixtures_synth import synth_dir  # noqa: F401 (a fixture this one uses)

from soundstage.manifests.table import PATH_COLUMNS, read_manifest, resolve_path

_MADE: dict[str, dict] = {}


def absolute_manifest(src: str, dst: str, keep=None) -> str:
    """A copy of the manifest ``src`` with absolute paths (so it can live anywhere), only the
    rows whose clip id is in ``keep`` when given."""
    df = read_manifest(src)
    base = os.path.dirname(os.path.abspath(src))
    for column in PATH_COLUMNS:
        if column in df.columns:
            df[column] = [resolve_path(v, base) if v else "" for v in df[column]]
    if keep is not None:
        df = df[df["clip_id"].isin(list(keep))]
    pd.DataFrame(df).to_csv(dst, index=False)
    return dst


def train_tiny(manifest: str, cache: str, out: str, **settings) -> str:
    from soundstage.train.config import resolve_config
    from soundstage.train.loop import train

    options = dict(manifest=manifest, cache=cache, out=out, epochs=1, max_steps=2, batch_size=2, probes=[], eval_batch_size=8)
    options.update(settings)
    train(resolve_config(None, options), log=lambda *_: None, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synth_dir):  # noqa: F811
    session = str(tmp_path_factory.getbasetemp())
    if session not in _MADE:
        from soundstage.models.tiny import build_vggish
        from soundstage.pipeline.runner import run_stage
        from soundstage.stages import get_stage

        root = str(tmp_path_factory.mktemp("trained"))
        manifest = absolute_manifest(os.path.join(synth_dir, "manifest.csv"), os.path.join(root, "manifest.csv"))
        cache = os.path.join(root, "cache")
        checkpoint = build_vggish(os.path.join(root, "vggish.pth"))
        summary = run_stage(
            get_stage("vggish"), manifest, cache, {"checkpoint": checkpoint, "device": "cpu"}, progress=False, log=lambda *_: None
        )
        assert summary.ok, summary.format()
        run = train_tiny(manifest, cache, os.path.join(root, "runs", "stage1"))
        _MADE[session] = {"root": root, "manifest": manifest, "cache": cache, "run": run}
    return _MADE[session]
