"""A broken model is not a bad clip: many clips in a row failing with errors that are not about
their input stop the run with one message and a nonzero exit, even with --allow-failed-clips."""

from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

from soundstage.pipeline.registry import STAGE_MODULES, register_stage
from soundstage.pipeline.stage import ClipError, Field, Stage

sys.path.insert(0, os.path.dirname(__file__))


def _broken_model(model, items, params):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _bad_input(row, ctx):
    raise ClipError(f"unreadable input of {row['clip_id']}")


BROKEN = Stage(
    name="toy-broken",
    version=1,
    fields=[Field("n", "int32", ())],
    load=lambda row, ctx: row["clip_id"],
    process=_broken_model,
    default_batch_size=2,
)
BAD_INPUTS = Stage(
    name="toy-bad-inputs",
    version=1,
    fields=[Field("n", "int32", ())],
    load=_bad_input,
    process=lambda model, items, params: items,
)


@pytest.fixture
def manifest(tmp_path):
    register_stage("toy-broken", "test_systemic_failure:BROKEN")
    register_stage("toy-bad-inputs", "test_systemic_failure:BAD_INPUTS")
    path = tmp_path / "manifest.csv"
    path.write_text("clip_id\n" + "".join(f"clip{i:02d}\n" for i in range(10)))
    yield str(path)
    STAGE_MODULES.pop("toy-broken", None)
    STAGE_MODULES.pop("toy-bad-inputs", None)


def _run(stage_name, manifest, cache, *extra):
    from soundstage.cli import main

    return CliRunner().invoke(
        main,
        [stage_name, "--manifest", manifest, "--cache", cache, "--workers", "0", "--no-progress", "--allow-failed-clips", *extra],
        catch_exceptions=False,
    )


def test_a_broken_model_stops_the_run_with_one_message(manifest, tmp_path):
    from soundstage.cache.store import iter_stage_dirs

    cache = str(tmp_path / "cache")
    result = _run("toy-broken", manifest, cache, "--max-consecutive-errors", "4")
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "stopped after 4 clips in a row failed" in line and "CUDA error" in line
    (sd,) = iter_stage_dirs(cache, "toy-broken")
    assert len(sd.failures()) == 4  # what was tried is recorded; the other clips are not marked failed
    assert not sd.committed_ids()


def test_bad_inputs_are_clip_failures_and_the_run_goes_on(manifest, tmp_path):
    result = _run("toy-bad-inputs", manifest, str(tmp_path / "cache"), "--max-consecutive-errors", "4")
    assert result.exit_code == 0, result.output  # every clip tried; --allow-failed-clips
    assert "failed 10" in result.output
