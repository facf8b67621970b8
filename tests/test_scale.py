"""What keeps large outputs cheap: failure records that do not grow with reruns, checksums read
in blocks, the k-means sample filled into one array, and array tasks that read their planned
rows instead of the whole manifest."""

from __future__ import annotations

import json
import os
import tracemalloc

import h5py
import numpy as np
import pandas as pd
import pytest

from soundstage.cache.index import output_status
from soundstage.cache.maintenance import verify_part
from soundstage.cache.reader import open_stage
from soundstage.cache.store import Field, StageDir, array_checksum, dataset_checksum, field_schema, write_part_file
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import ClipError, Stage
from soundstage.stages.kmeans import read_sample


def _load(row, ctx):
    if row["value"] == "bad":
        raise ClipError("bad value")
    return {"x": np.float32(float(row["value"]))}


FLAKY = Stage("flaky", 1, fields=[Field("x", "float32")], load=_load, reads=("value",))


def _records(sd: StageDir) -> int:
    return sum(len(open(os.path.join(sd.failures_dir, n)).readlines()) for n in os.listdir(sd.failures_dir))


def test_failure_records_do_not_grow_with_reruns_and_clips_done_since_leave_them(tmp_path):
    values = ["bad" if k % 3 == 0 else str(k) for k in range(30)]
    manifest, cache = str(tmp_path / "m.csv"), str(tmp_path / "cache")
    pd.DataFrame({"clip_id": [f"c{k}" for k in range(30)], "value": values}).to_csv(manifest, index=False)
    for _ in range(3):
        summary = run_stage(FLAKY, manifest, cache, progress=False)
        assert len(summary.failed) == 10
    sd = StageDir(summary.path)
    assert _records(sd) <= 20  # the last run's 10 and the earlier runs folded into 10
    run_stage(FLAKY, manifest, cache, progress=False)
    assert _records(sd) <= 20 and len(sd.failures()) == 10
    values[0] = "0"  # fixed in the manifest: done by the next run, its record goes at the run after
    pd.DataFrame({"clip_id": [f"c{k}" for k in range(30)], "value": values}).to_csv(manifest, index=False)
    assert len(run_stage(FLAKY, manifest, cache, progress=False).failed) == 9
    run_stage(FLAKY, manifest, cache, progress=False)
    assert "c0" not in sd.failures() and output_status(sd, [f"c{k}" for k in range(30)]).failed.keys() == {
        f"c{k}" for k in range(3, 30, 3)
    }
    records = [json.loads(line) for n in os.listdir(sd.failures_dir) for line in open(os.path.join(sd.failures_dir, n))]
    assert all(r["clip_id"] != "c0" for r in records)


def test_checksums_read_in_blocks_equal_the_whole_array_checksum(tmp_path):
    path = str(tmp_path / "p.h5")
    columns = {
        "f16": np.random.default_rng(0).random((999, 5)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "flags": np.arange(17) % 2 == 0,
        "names": ["a", "bé", ""] * 7,
    }
    write_part_file(path, columns, {})
    with h5py.File(path, "r") as h5:
        stored = json.loads(h5.attrs["checksums"])
        for name, values in columns.items():
            independent = array_checksum(np.asarray(values) if isinstance(values, np.ndarray) else values)
            assert stored[name] == independent == dataset_checksum(h5[name], block_bytes=64)


def test_verify_reads_a_part_in_blocks_not_whole(tmp_path):
    sd = StageDir(str(tmp_path / "big" / "fp"))
    fields = [Field("features", "float32", (None, 64))]
    meta = {"stage": "big", "version": 1, "fingerprint": "fp", "fields": field_schema(fields)}
    sd.initialise(meta)
    rows = [(f"c{k}", {"features": np.full((2000, 64), k, np.float32)}) for k in range(8)]  # 4 MB
    path = sd.write_part("w", 0, fields, rows, meta)
    tracemalloc.start()
    problems, ids = verify_part(path, fields)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert problems == [] and len(ids) == 8 and peak < 4 * 2**20  # below one copy of the dataset


def test_the_kmeans_sample_is_one_array_filled_in_place(tmp_path):
    sd = StageDir(str(tmp_path / "hubert" / "fp"))
    fields = [Field("features", "float16", (None, 32))]
    meta = {"stage": "hubert", "version": 1, "fingerprint": "fp", "fields": field_schema(fields)}
    sd.initialise(meta)
    rng = np.random.default_rng(1)
    values = {f"c{k}": rng.random((200 + k, 32)).astype(np.float16) for k in range(40)}
    for p in range(4):
        sd.write_part("w", p, fields, [(cid, {"features": values[cid]}) for cid in list(values)[p * 10 : p * 10 + 10]], meta)
    reader = open_stage(sd.path)
    chosen = sorted(values)[::3]
    expected = np.concatenate([values[c].astype(np.float32) for c in chosen])
    tracemalloc.start()
    sample = read_sample(reader, chosen)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sample.dtype == np.float32 and np.array_equal(sample, expected)
    assert peak < 1.2 * sample.nbytes  # the sample and one clip, not twice the sample


# ------------------------------------------------------------------------------ task plans


def _plan_manifest(path, n):
    ids = [f"c{k:03d}" for k in range(n)]
    pd.DataFrame({"clip_id": ids + ["c007", " "], "value": [str(k) for k in range(n)] + ["7", "0"], "x": "y"}).to_csv(
        path, index=False
    )


def _write_plans(out, manifest, stage, count, shard_ids):
    """The task plans as the SLURM planner writes them, from the manifest it has read."""
    from soundstage.pipeline.runner import manifest_rows
    from soundstage.pipeline.task_plan import manifest_stamp, write_task_plans

    return write_task_plans(out, manifest, stage, count, shard_ids, read=(manifest_stamp(manifest), *manifest_rows(manifest)))


def _values_of(path):
    reader = open_stage(path)
    return {cid: float(reader[cid]["x"]) for cid in reader}


def test_array_tasks_read_their_planned_rows_and_never_the_manifest(tmp_path, monkeypatch):
    from soundstage.cache import table
    from soundstage.pipeline import shard as shard_module

    manifest = str(tmp_path / "m.csv")
    _plan_manifest(manifest, 40)
    reference = run_stage(FLAKY, manifest, str(tmp_path / "reference"), progress=False)
    plans = _write_plans(str(tmp_path / "out"), manifest, FLAKY, 4, [0, 1, 2, 3])

    def no_manifest(*a, **k):
        raise AssertionError("an array task with a plan read the manifest")

    monkeypatch.setattr(table, "read_manifest", no_manifest)
    monkeypatch.setattr(shard_module, "read_manifest", no_manifest)
    summaries = [
        run_stage(FLAKY, manifest, str(tmp_path / "cache"), shard=(i, 4), task_plan=plans, progress=False) for i in range(4)
    ]
    assert sum(s.selected for s in summaries) == 40 and sum(s.done for s in summaries) == 40
    assert all(not s.notes for s in summaries)
    # the duplicate and the empty id are reported once, by the shard that owns each
    assert sorted(cid for s in summaries for cid, _ in s.failed) == sorted(cid for cid, _ in reference.failed)
    assert _values_of(summaries[0].path) == _values_of(reference.path)


def test_a_manifest_changed_since_submission_or_a_missing_plan_is_read_again_and_said(tmp_path):
    manifest, cache = str(tmp_path / "m.csv"), str(tmp_path / "cache")
    _plan_manifest(manifest, 20)
    plans = _write_plans(str(tmp_path / "out"), manifest, FLAKY, 2, [0])
    _plan_manifest(manifest, 30)  # grown since the run was submitted
    changed = run_stage(FLAKY, manifest, cache, shard=(0, 2), task_plan=plans, progress=False)
    assert any("changed since the run was submitted: read the manifest instead" in n for n in changed.notes)
    from soundstage.pipeline.shard import shard_of

    assert changed.selected == sum(shard_of(f"c{k:03d}", 2) == 0 for k in range(30))  # the manifest as it is now
    missing = run_stage(FLAKY, manifest, cache, shard=(1, 2), task_plan=plans, progress=False)
    assert any("no task plan" in n for n in missing.notes)
    assert missing.done == sum(shard_of(f"c{k:03d}", 2) == 1 for k in range(30))


def test_jobs_inside_an_array_task_split_its_planned_rows(tmp_path):
    from soundstage.pipeline.local import run_local

    manifest, cache = str(tmp_path / "m.csv"), str(tmp_path / "cache")
    _plan_manifest(manifest, 30)
    plans = _write_plans(str(tmp_path / "out"), manifest, FLAKY, 2, [0, 1])
    done = [run_local(FLAKY, manifest, cache, {}, shard=(i, 2), jobs=2, task_plan=plans, progress=False) for i in range(2)]
    assert sum(s.done for s in done) == 30 and all(not s.notes for s in done)
    assert _values_of(done[0].path) == {f"c{k:03d}": float(k) for k in range(30)}


def test_jobs_start_no_process_when_there_is_nothing_to_do(tmp_path, monkeypatch):
    from soundstage.pipeline import local

    manifest, cache = str(tmp_path / "m.csv"), str(tmp_path / "cache")
    pd.DataFrame({"clip_id": [f"c{k:03d}" for k in range(30)], "value": [str(k) for k in range(30)]}).to_csv(
        manifest, index=False
    )
    first = local.run_local(FLAKY, manifest, cache, {}, jobs=3, progress=False)
    assert first.done == 30
    started = []
    real = local.ShardProcess

    def counted(stage, args, shard, kwargs):
        started.append(shard)
        return real(stage, args, shard, kwargs)

    monkeypatch.setattr(local, "ShardProcess", counted)
    again = local.run_local(FLAKY, manifest, cache, {}, jobs=3, progress=False)
    assert started == [] and (again.selected, again.cached, again.done, again.stale) == (30, 30, 0, 0)

    values = [str(k + 100) if k == 7 else str(k) for k in range(30)]  # one clip's input changed
    pd.DataFrame({"clip_id": [f"c{k:03d}" for k in range(30)], "value": values}).to_csv(manifest, index=False)
    third = local.run_local(FLAKY, manifest, cache, {}, jobs=3, progress=False)
    assert len(started) == 3  # something to do: each shard in its process, as before
    assert (third.selected, third.cached, third.done, third.stale) == (30, 29, 1, 1)
    assert float(open_stage(third.path)["c007"]["x"]) == 107.0
    forced = local.run_local(FLAKY, manifest, cache, {}, jobs=3, progress=False, force=True)
    assert forced.done == 30 and len(started) == 6


def test_plans_written_from_the_planners_rows_equal_each_shards_rows_read_from_the_manifest(tmp_path):
    import dataclasses
    import glob

    from soundstage.cache.table import ManifestError
    from soundstage.pipeline.runner import manifest_rows
    from soundstage.pipeline.shard import in_shard, manifest_share
    from soundstage.pipeline.task_plan import manifest_stamp, read_task_plan, write_task_plans

    manifest = str(tmp_path / "m.csv")
    _plan_manifest(manifest, 50)
    read = (manifest_stamp(manifest), *manifest_rows(manifest))
    every_column = dataclasses.replace(FLAKY, reads=None)
    for stage in (FLAKY, every_column):
        plans = write_task_plans(str(tmp_path / stage.name), manifest, stage, 4, [0, 2, 3], read=read)
        assert len(glob.glob(os.path.join(plans, "*.json"))) == 3
        for i in (0, 2, 3):
            (rows, bad), why = read_task_plan(plans, manifest, (i, 4))
            want_rows, want_bad = manifest_share(manifest, stage, (i, 4))  # what the task would read itself
            assert why == "" and rows == want_rows and bad == [b for b in want_bad if in_shard(b[0], (i, 4))]
    needs = dataclasses.replace(FLAKY, required_columns=("value", "audio_path"))
    with pytest.raises(ManifestError, match="audio_path"):
        write_task_plans(str(tmp_path / "c"), manifest, needs, 4, [0], read=read)
