"""One notion of status: ``output_status`` answers what is committed, failed and left, for
per-clip and whole-dataset outputs alike, and executors are objects with one interface."""

from __future__ import annotations

import os
import sys

import h5py
import numpy as np
import pytest

from soundstage.cache.index import output_status
from soundstage.cache.store import RESULT_FORMAT, StageDir
from soundstage.pipeline.executors import LocalExecutor, SlurmExecutor, stage_work
from soundstage.pipeline.registry import STAGE_MODULES, register_stage
from soundstage.pipeline.runner import RunOptions, manifest_rows, pending_clips, plan_stage, run_stage
from soundstage.pipeline.stage import ClipError, Field, Stage

sys.path.insert(0, os.path.dirname(__file__))


def _load(row, ctx):
    if row["clip_id"].endswith("3"):
        raise ClipError("clip 3 is broken")
    return {"n": len(row["clip_id"])}


PER_CLIP = Stage(name="toy-count", version=1, fields=[Field("n", "int32", ())], load=_load)
WHOLE = Stage(
    name="toy-total", version=1, kind="global", fit=lambda ctx: {"clips": np.array([len(ctx.clip_ids)], dtype=np.int64)}
)


@pytest.fixture
def manifest(tmp_path):
    register_stage("toy-count", "test_status:PER_CLIP")
    register_stage("toy-total", "test_status:WHOLE")
    path = tmp_path / "manifest.csv"
    path.write_text("clip_id\n" + "".join(f"clip{i}\n" for i in range(6)))
    yield str(path)
    STAGE_MODULES.pop("toy-count", None)
    STAGE_MODULES.pop("toy-total", None)


def test_status_of_a_per_clip_output(manifest, tmp_path):
    cache = str(tmp_path / "cache")
    ids = [f"clip{i}" for i in range(6)]
    plan = plan_stage(PER_CLIP, manifest, cache, {}, log=lambda *_: None)
    before = output_status(plan.dir, ids, whole_dataset=False)  # nothing there yet
    assert (before.done, before.failed, before.todo, before.complete) == (frozenset(), {}, ids, False)
    run_stage(PER_CLIP, manifest, cache, options=RunOptions(shard=(0, 2), progress=False))  # = shard=..., progress=...
    status = output_status(plan.dir, ids)
    done_by_hand = {cid for cid in ids if cid in plan.dir.committed_ids()}
    assert status.done == done_by_hand and 0 < len(done_by_hand) < 5
    assert set(status.failed) <= {"clip3"} and status.todo == [c for c in ids if c not in done_by_hand]
    assert status.never_tried == len(status.todo) - len(status.failed)
    assert pending_clips(PER_CLIP, {}, manifest, cache) == len(status.todo)
    run_stage(PER_CLIP, manifest, cache, progress=False)
    status = output_status(plan.dir, ids)
    assert (len(status.done), list(status.failed), status.todo, status.complete) == (5, ["clip3"], ["clip3"], False)
    assert output_status(plan.dir, ["clip0", "clip1"]).complete  # asked about those only


def test_status_and_result_file_of_a_whole_dataset_output(manifest, tmp_path):
    cache = str(tmp_path / "cache")
    plan = plan_stage(WHOLE, manifest, cache, {}, log=lambda *_: None)
    assert not output_status(plan.dir, whole_dataset=True).complete and pending_clips(WHOLE, {}, manifest, cache) == 1
    run_stage(WHOLE, manifest, cache, progress=False)
    status = output_status(
        plan.dir,
    )
    assert status.whole_dataset and status.fitted and status.complete and status.todo == []
    with h5py.File(plan.dir.result_path, "r") as h5:  # the result says what it is, as parts do
        assert h5.attrs["format"] == RESULT_FORMAT
        assert (h5.attrs["stage"], h5.attrs["fingerprint"]) == ("toy-total", plan.fingerprint)
        assert h5["clips"][0] == 6


def test_executors_share_one_interface(manifest, tmp_path):
    cache = str(tmp_path / "cache")
    rows, _ = manifest_rows(manifest)
    works = []
    for stage in (PER_CLIP, WHOLE):
        plan = plan_stage(stage, manifest, cache, {}, log=lambda *_: None)
        works.append(stage_work(stage, {}, {}, plan.dir, rows, plan.meta, shards=2, cli_args=["--manifest", manifest]))
    said = []
    assert LocalExecutor(manifest, cache, dry_run=True, out=said.append).run(works) == 0
    assert said == [
        f"would run toy-count {works[0].dir.path.rsplit(os.sep, 1)[1]} on 6 missing clip(s) in 2 local process(es)",
        f"would run toy-total {works[1].dir.path.rsplit(os.sep, 1)[1]} on the whole-dataset result in 2 local process(es)",
    ]
    said.clear()
    assert SlurmExecutor(manifest, cache, dry_run=True, out=said.append).run(works) == 0
    scripts = "\n".join(said)
    assert "#SBATCH --array=0-1" in scripts and scripts.count("#!/bin/bash") == 2
    assert not StageDir.at(cache, "toy-count", works[0].meta["fingerprint"]).exists()  # a dry run writes nothing
    assert LocalExecutor(manifest, cache, out=said.append, runner_options={"workers": 0, "progress": False}).run(works) == 1
    assert [output_status(w.dir, whole_dataset=w.whole_dataset).complete for w in works] == [False, True]  # clip3 failed
