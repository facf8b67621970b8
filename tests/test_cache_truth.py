"""The cache never lies and heals itself: no litter from failed attempts, damaged parts found and
repaired, changed inputs recomputed, safe compaction, one shard count at a time."""

import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from click.testing import CliRunner

from soundstage.cache import StageDir, open_stage
from soundstage.cache.checksum import USERBLOCK_BYTES
from soundstage.cache.locks import (
    OutputBusy,
    ShardCountConflict,
    exclusive_lock,
    writer_lock,
)
from soundstage.cache.maintenance import compact_stage
from soundstage.cache.quarantine import CorruptPart
from soundstage.cache.store import CacheError, iter_stage_dirs
from soundstage.cli import main
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import Field, Param, Stage
from soundstage.stages import STAGE_MODULES, get_stage, register_stage

sys.path.insert(0, os.path.dirname(__file__))
from _wavs import make_wavs, tone, write_manifest  # noqa: E402
from engine_stages import SLOW  # noqa: E402

AUDIO_STATS = get_stage("audio-stats")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def wavs(tmp_path):
    """(data root, manifest rows, manifest path, cache root) of 6 fresh clips."""
    root = str(tmp_path / "data")
    rows = make_wavs(root, n=6)
    return root, rows, write_manifest(root, rows), str(tmp_path / "c")


@pytest.fixture
def toy_stages():
    register_stage("toy-sum", "engine_stages:SUM")
    register_stage("toy-mean", "engine_stages:MEAN")
    yield
    STAGE_MODULES.pop("toy-sum", None)
    STAGE_MODULES.pop("toy-mean", None)


def _check_layer(params):
    if params["layer"] > 2:
        raise ValueError(f"--layer {params['layer']} is out of range: the model has 2 layers")
    return "model"


LAYERED = Stage(
    name="toy-layered",
    version=1,
    params=[Param("layer", int, 1)],
    fields=[Field("n", "int64", ())],
    load=lambda row, ctx: {"n": 1},
    process=lambda model, items, params: items,
    setup=_check_layer,
)


def read_all(path):
    reader = open_stage(path)
    return {cid: reader[cid] for cid in sorted(reader)}


def corrupt_dataset(path, dataset):
    with h5py.File(path, "r") as h5:
        offset = h5[dataset].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xff\xff\xff")


def part_of(sd, clip_id):
    for path in sd.part_paths():
        with h5py.File(path, "r") as h5:
            if clip_id in h5["clip_id"].asstr()[...].tolist():
                return path
    raise AssertionError(clip_id)


# ------------------------------------------------------------------- failed attempts: no litter


def test_a_failed_first_attempt_leaves_no_output_and_empty_outputs_are_never_upstream(wavs, tmp_path, toy_stages):
    root, rows, manifest, cache = wavs
    with pytest.raises(ValueError, match="out of range"):
        run_stage(LAYERED, manifest, cache, {"layer": 7}, progress=False)
    assert not os.path.exists(os.path.join(cache, "toy-layered"))
    assert run_stage(LAYERED, manifest, cache, {"layer": 2}, progress=False).done == len(rows)

    # an output planned but never committed (a crashed first attempt, an unfinished submission)
    stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)
    from soundstage.pipeline.runner import plan_stage

    empty = plan_stage(AUDIO_STATS, manifest, cache, {"silence_db": -30.0}, log=lambda *_: None)
    empty.dir.initialise(empty.meta)
    messages = []
    summed = run_stage(get_stage("toy-sum"), manifest, cache, progress=False, log=messages.append)
    assert summed.done == len(rows)
    assert any(f"using the only audio-stats output in {cache}: {stats.fingerprint}" in m for m in messages)


def test_a_mistyped_local_model_path_is_named_and_leaves_nothing(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    with pytest.raises(FileNotFoundError, match="no such file or directory: ../models/hubret"):
        model_identity("../models/hubret")
    result = CliRunner().invoke(
        main, ["hubert", "--manifest", manifest, "--cache", cache, "--model", "../models/hubret", "--workers", "0"]
    )
    assert result.exit_code == 1
    assert "Error: no such file or directory: ../models/hubret" in result.output
    assert "repo" not in result.output.lower() and not os.path.exists(cache)


def test_cache_rm_lists_dependents_and_gc_removes_empty_and_orphaned_outputs(wavs, tmp_path, toy_stages):
    root, rows, manifest, cache = wavs
    stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)
    summed = run_stage(get_stage("toy-sum"), manifest, cache, progress=False)
    fitted = run_stage(get_stage("toy-mean"), manifest, cache, progress=False)
    cli = CliRunner()
    refused = cli.invoke(main, ["cache", "rm", "--cache", cache, f"audio-stats/{stats.fingerprint[:6]}"])
    assert refused.exit_code == 1
    assert f"depends on it: toy-sum/{summed.fingerprint}" in refused.output
    assert f"depends on it: toy-mean/{fitted.fingerprint}" in refused.output
    assert "pass --dependents" in refused.output and os.path.isdir(stats.path)
    # removing the leaf alone is fine
    leaf = cli.invoke(main, ["cache", "rm", "--cache", cache, fitted.fingerprint])
    assert leaf.exit_code == 0 and not os.path.exists(fitted.path)

    # gc: an empty output and an orphan (its upstream removed by hand) go; a live writer's output stays
    from soundstage.pipeline.runner import plan_stage

    empty = plan_stage(AUDIO_STATS, manifest, cache, {"silence_db": -20.0}, log=lambda *_: None)
    empty.dir.initialise(empty.meta)
    busy = plan_stage(AUDIO_STATS, manifest, cache, {"silence_db": -10.0}, log=lambda *_: None)
    busy.dir.initialise(busy.meta)
    submitted = plan_stage(AUDIO_STATS, manifest, cache, {"silence_db": -5.0}, log=lambda *_: None)
    submitted.dir.initialise(submitted.meta)
    os.makedirs(os.path.join(submitted.dir.path, "logs"))  # a SLURM submission: its tasks may be queued
    os.rename(stats.path, str(tmp_path / "moved-away"))
    with writer_lock(busy.dir, (0, 1)):
        result = cli.invoke(main, ["cache", "gc", "--cache", cache])
    assert result.exit_code == 1, result.output  # one output was busy
    assert f"nothing committed: audio-stats/{empty.fingerprint}" in result.output
    assert f"upstream audio-stats/{stats.fingerprint} is gone: toy-sum/{summed.fingerprint}" in result.output
    assert "a writer is running" in result.output
    assert not os.path.exists(empty.dir.path) and not os.path.exists(summed.path) and os.path.isdir(busy.dir.path)
    assert cli.invoke(main, ["cache", "gc", "--cache", cache]).exit_code == 0
    assert not os.path.exists(busy.dir.path) and os.path.isdir(submitted.dir.path)


# ------------------------------------------------------------------------------ damaged cache


def test_status_lists_a_broken_part_and_every_error_names_the_file(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    stats = run_stage(AUDIO_STATS, manifest, cache, commit_every=2, progress=False)
    slow = run_stage(SLOW, manifest, cache, progress=False)
    broken = StageDir(stats.path).part_paths()[1]
    with open(broken, "r+b") as f:  # the superblock (after the user block): h5py cannot even open it
        f.seek(USERBLOCK_BYTES)
        f.write(b"\0" * 64)
    garbled = os.path.join(cache, "audio-stats", "0123456789abcdef")
    os.makedirs(garbled)
    with open(os.path.join(garbled, "stage.json"), "w") as f:
        f.write('{"stage": "audio-st')
    status = CliRunner().invoke(main, ["status", "--cache", cache])
    assert status.exit_code == 0, status.output
    assert f"BROKEN {garbled}/stage.json: unreadable" in status.output
    with pytest.raises(CacheError, match=f"{garbled}/stage.json: unreadable"):
        StageDir(garbled).meta()
    shutil.rmtree(garbled)
    assert f"BROKEN {broken}: unreadable part file" in status.output
    assert f"soundstage verify --repair {stats.path}" in status.output
    assert f"toy-slow     {slow.fingerprint}  done       {len(rows)}" in status.output  # the others are still listed
    rerun = CliRunner().invoke(main, ["audio-stats", "--manifest", manifest, "--cache", cache, "--workers", "0"])
    assert rerun.exit_code == 1 and f"Error: {broken}: unreadable part file" in rerun.output
    with pytest.raises(Exception, match=f"{broken}: unreadable part file"):
        open_stage(stats.path)
    verify = CliRunner().invoke(main, ["verify", "--repair", "--cache", cache])
    assert verify.exit_code == 0 and os.path.basename(broken) in verify.output
    assert run_stage(AUDIO_STATS, manifest, cache, progress=False).done == 2


def test_verify_repair_quarantines_bad_parts_and_the_rerun_recomputes_exactly_their_clips(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    reference = read_all(run_stage(SLOW, manifest, str(tmp_path / "ref"), progress=False).path)
    slow = run_stage(SLOW, manifest, cache, commit_every=2, progress=False)
    sd = StageDir(slow.path)
    bad = part_of(sd, rows[0]["clip_id"])
    later = part_of(sd, rows[5]["clip_id"])
    assert bad != later
    lost = set()
    for path in (bad, later):
        with h5py.File(path, "r") as h5:
            lost |= set(h5["clip_id"].asstr()[...])
    corrupt_dataset(bad, "peak")
    cli = CliRunner()
    verify = cli.invoke(main, ["verify", "--cache", cache])
    assert verify.exit_code == 1 and "checksum mismatch in peak" in verify.output
    # until repaired: reads of the bad part fail, and so does a run (naming the part)
    reader = open_stage(slow.path)
    with pytest.raises(CorruptPart, match=os.path.basename(bad)):
        reader[rows[0]["clip_id"]]
    with pytest.raises(CorruptPart, match=os.path.basename(bad)):
        run_stage(SLOW, manifest, cache, progress=False)
    # after a failed verify, a part changed since (unchecked) is checksummed before it is read
    corrupt_dataset(later, "peak")
    with pytest.raises(CorruptPart, match="checksum mismatch in peak"):
        open_stage(slow.path)[rows[5]["clip_id"]]

    repaired = cli.invoke(main, ["verify", "--repair", "--cache", cache])
    assert repaired.exit_code == 0, repaired.output
    assert "quarantined ->" in repaired.output
    quarantined = sorted(n for n in os.listdir(os.path.join(slow.path, "quarantine")) if n.endswith(".h5"))
    assert [n.split("-", 1)[1] for n in quarantined] == sorted(os.path.basename(p) for p in (bad, later))
    rerun = run_stage(SLOW, manifest, cache, progress=False)
    assert (rerun.done, rerun.cached, rerun.stale) == (len(lost), len(rows) - len(lost), 0)
    again = read_all(slow.path)
    assert sorted(again) == sorted(reference)
    for cid in reference:
        np.testing.assert_array_equal(again[cid]["energy"], reference[cid]["energy"])
        assert again[cid]["peak"] == reference[cid]["peak"]
    assert cli.invoke(main, ["verify", "--cache", cache]).exit_code == 0


# ------------------------------------------------------------------------- changed inputs


def test_changed_inputs_recompute_exactly_their_clips_and_downstream(wavs, tmp_path, toy_stages):
    root, rows, manifest, cache = wavs
    stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)
    run_stage(get_stage("toy-sum"), manifest, cache, progress=False)
    slow = run_stage(SLOW, manifest, cache, progress=False)
    # a fixed audio file: louder, same length
    fixed = rows[2]
    path = os.path.join(root, fixed["audio_path"])
    sf.write(
        path,
        tone(fixed["sr"], fixed["seconds"], 300, 0.5)
        if fixed["channels"] == 1
        else np.stack([tone(fixed["sr"], fixed["seconds"], 300, 0.5)] * 2, axis=1),
        fixed["sr"],
    )
    again = run_stage(AUDIO_STATS, manifest, cache, progress=False)
    assert (again.done, again.cached, again.stale) == (1, len(rows) - 1, 1)
    assert "stale 1" in again.format()
    fresh = read_all(run_stage(AUDIO_STATS, manifest, str(tmp_path / "fresh"), progress=False).path)
    served = read_all(stats.path)  # the newest version of the clip, not the first
    np.testing.assert_array_equal(served[fixed["clip_id"]]["rms_db"], fresh[fixed["clip_id"]]["rms_db"])
    # downstream: exactly that clip is stale through its upstream digest
    downstream = run_stage(get_stage("toy-sum"), manifest, cache, progress=False)
    assert (downstream.done, downstream.stale) == (1, 1)
    total = open_stage(downstream.path)[fixed["clip_id"]]["total"]
    assert total == pytest.approx(float(np.sum(fresh[fixed["clip_id"]]["rms_db"])))
    # an edited manifest cell: stale for a stage that reads every column (the default), not for
    # audio-stats, which declares that it reads audio_path only
    edited = pd.read_csv(manifest)
    edited.loc[4, "seconds"] = 3
    edited.to_csv(manifest, index=False)
    assert run_stage(AUDIO_STATS, manifest, cache, progress=False).stale == 0
    edited_run = run_stage(SLOW, manifest, cache, progress=False)
    assert (edited_run.stale, edited_run.done) == (2, 2)  # the fixed audio file and the edited cell
    assert run_stage(SLOW, manifest, cache, progress=False).done == 0
    forced = run_stage(SLOW, manifest, cache, progress=False, force=True)
    assert (forced.done, forced.cached) == (len(rows), 0)
    assert len(open_stage(slow.path)) == len(rows)


def test_clips_committed_before_digests_are_trusted_and_counted(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    slow = run_stage(SLOW, manifest, cache, progress=False)
    sd = StageDir(slow.path)
    for path in sd.part_paths():  # what an older soundstage wrote: no /input_digest
        with h5py.File(path, "r+") as h5:
            del h5["input_digest"]
            checksums = json.loads(h5.attrs["checksums"])
            checksums.pop("input_digest")
            h5.attrs["checksums"] = json.dumps(checksums)
    again = run_stage(SLOW, manifest, cache, progress=False)
    assert (again.done, again.cached, again.undigested) == (0, len(rows), len(rows))
    assert "have no input digest" in again.format()
    assert run_stage(SLOW, manifest, cache, progress=False, force=True).done == len(rows)
    assert run_stage(SLOW, manifest, cache, progress=False).undigested == 0


def test_a_whole_dataset_fit_is_keyed_by_its_clips(tmp_path, toy_stages):
    root = str(tmp_path / "data")
    rows = make_wavs(root, n=6)
    small, big = write_manifest(root, rows[:3], "small.csv"), write_manifest(root, rows, "big.csv")
    cache = str(tmp_path / "c")
    run_stage(AUDIO_STATS, big, cache, progress=False)
    mean = get_stage("toy-mean")
    first = run_stage(mean, small, cache, progress=False)
    assert first.done == 1 and open_stage(first.path)["clips"][0] == 3
    assert run_stage(mean, small, cache, progress=False).cached == 1
    pinned = run_stage(mean, big, cache, progress=False, reuse_fit=first.fingerprint)
    assert (
        pinned.cached == 1
        and "reusing the fit pinned with --reuse-fit (fitted on 3 clips; this manifest has 6)" in pinned.format()
    )
    status = CliRunner().invoke(main, ["status", "--cache", cache])
    assert "fitted on 3 clips" in status.output and "pinned with --reuse-fit for a manifest of 6 clips" in status.output
    refit = run_stage(mean, big, cache, progress=False)
    assert (
        refit.done == 1
        and "refitting: its clips, or the versions of their upstream clips, changed since the fit (3 clips" in refit.format()
    )
    assert open_stage(first.path)["clips"][0] == 6
    status = CliRunner().invoke(main, ["status", "--cache", cache])
    assert "fitted on 6 clips" in status.output and "pinned" not in status.output
    with pytest.raises(ValueError, match="--reuse-fit nope"):
        run_stage(mean, small, cache, progress=False, reuse_fit="nope")


# --------------------------------------------------------------------- compaction and locks


def test_compaction_is_refused_while_a_writer_runs_and_excludes_another_compaction(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    slow = run_stage(SLOW, manifest, cache, commit_every=2, progress=False)
    sd = StageDir(slow.path)
    with writer_lock(sd, (0, 1)):
        with pytest.raises(OutputBusy, match="a writer is running"):
            compact_stage(sd, 10_000_000, "compact-test")
        result = CliRunner().invoke(main, ["cache", "compact", "--cache", cache])
        assert result.exit_code == 1 and "a writer is running" in result.output
    with exclusive_lock(sd, "compact"):
        with pytest.raises(OutputBusy, match="another maintenance command"):
            compact_stage(sd, 10_000_000, "compact-other")
        with pytest.raises(OutputBusy, match="being compacted"):
            run_stage(SLOW, manifest, cache, progress=False)
    assert len(sd.part_paths()) == 3
    assert compact_stage(sd, 10_000_000, "compact-test") == (3, 1)


READER_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from soundstage.cache import open_stage
reader = open_stage({path!r}, max_open=1)
expected = {{cid: reader[cid]["peak"] for cid in reader}}
open({ready!r}, "w").close()
reads, errors, parts_seen = 0, [], set()
while True:
    done = os.path.exists({stop!r})
    for cid, peak in expected.items():
        try:
            if reader[cid]["peak"] != peak:
                errors.append(f"{{cid}}: wrong value")
            reads += 1
        except Exception as e:
            errors.append(f"{{cid}}: {{type(e).__name__}}: {{e}}")
        parts_seen.update(os.path.basename(p) for p in reader.parts)
    if done:
        break
print(json.dumps({{"reads": reads, "errors": errors[:5], "n_errors": len(errors), "parts": sorted(parts_seen)}}))
"""


def test_a_reader_in_another_process_reads_every_clip_throughout_a_compaction(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    slow = run_stage(SLOW, manifest, cache, commit_every=1, progress=False)
    sd = StageDir(slow.path)
    ready, stop = str(tmp_path / "ready"), str(tmp_path / "stop")
    script = READER_SCRIPT.format(tests=HERE, path=slow.path, ready=ready, stop=stop)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(ready), proc.stderr.read() if proc.poll() is not None else "reader did not start"
        before = sd.part_paths()
        assert compact_stage(sd, 10_000_000, "compact-test") == (len(rows), 1)
        time.sleep(2.5)  # let the reader go round after the old parts are gone (it looks once a second)
        open(stop, "w").close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["n_errors"] == 0, report["errors"]
    (merged,) = sd.part_paths()
    assert os.path.basename(merged) in report["parts"] and report["reads"] > len(rows)
    assert all(os.path.basename(p) in report["parts"] for p in before)


def test_writers_with_different_shard_counts_are_refused_so_no_clip_is_computed_twice(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    probe = run_stage(SLOW, manifest, cache, shard=(0, 2), progress=False)
    sd = StageDir(probe.path)
    with writer_lock(sd, (0, 2)):
        with pytest.raises(ShardCountConflict, match=r"a writer with 2 shards is running .*use --shard i/2"):
            run_stage(SLOW, manifest, cache, shard=(1, 3), progress=False)
        other = run_stage(SLOW, manifest, cache, shard=(1, 2), progress=False)  # same count: disjoint clips
        assert other.done == len(rows) - probe.done
    after = run_stage(SLOW, manifest, cache, shard=(1, 3), progress=False)  # the writer is gone: fine
    assert after.done == 0
    ids = [cid for p in sd.part_paths() for cid in h5py.File(p, "r")["clip_id"].asstr()[...]]
    assert sorted(ids) == sorted(r["clip_id"] for r in rows)


def test_soundstage_run_recomputes_a_changed_clip_and_what_reads_it(wavs, tmp_path):
    root, rows, manifest, cache = wavs
    sys.path.insert(0, os.path.join(HERE, "slurm_site"))
    import soundstage_test_stages

    soundstage_test_stages.register()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"manifest: {manifest}\ncache: {cache}\nstages:\n  audio-stats: {{}}\n  test-loudest: {{}}\n")
    cli = CliRunner()
    assert cli.invoke(main, ["run", str(pipeline), "test-loudest", "--workers", "0"]).exit_code == 0
    again = cli.invoke(main, ["run", str(pipeline), "--workers", "0"])
    assert again.output.count("complete in the cache, skipped") == 2, again.output
    fixed = rows[1]
    louder = tone(fixed["sr"], fixed["seconds"], 300, 0.6)
    sf.write(
        os.path.join(root, fixed["audio_path"]), louder if fixed["channels"] == 1 else np.stack([louder] * 2, 1), fixed["sr"]
    )
    changed = cli.invoke(main, ["run", str(pipeline), "--workers", "0"])
    assert changed.exit_code == 0, changed.output
    assert changed.output.count("stale 1") == 2 and "skipped" not in changed.output, changed.output
    loudest = open_stage(os.path.join(cache, "test-loudest", os.listdir(os.path.join(cache, "test-loudest"))[0]))
    assert loudest[fixed["clip_id"]]["rms_db"] == pytest.approx(20 * np.log10(0.6 / np.sqrt(2)), abs=0.05)


def test_force_reaches_slurm_array_tasks(wavs):
    root, rows, manifest, cache = wavs
    run_stage(AUDIO_STATS, manifest, cache, progress=False)
    args = ["audio-stats", "--manifest", manifest, "--cache", cache, "--executor", "slurm", "--dry-run", "--shards", "2"]
    assert "nothing to submit" in CliRunner().invoke(main, args).output
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0 and "#SBATCH --array=0-1" in forced.output and " --force " in forced.output


def test_units_follow_an_edited_num_frames_and_kmeans_refits_for_a_bigger_manifest(tmp_path):
    """The two cases as users met them, through the real hubert -> kmeans -> units stages."""
    import torch
    from transformers import HubertModel

    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.models.tiny import tiny_hubert_config

    full = make_synthetic_dataset(str(tmp_path / "synth"), clips=5, seed=1, workers=1)
    table = pd.read_csv(full, dtype=str, keep_default_na=False)
    trial = str(tmp_path / "synth" / "trial.csv")
    table.iloc[:3].to_csv(trial, index=False)
    torch.manual_seed(0)
    HubertModel(tiny_hubert_config()).save_pretrained(tmp_path / "hubert")
    cache = str(tmp_path / "cache")
    quiet = dict(workers=0, progress=False, log=lambda *_: None)
    run_stage(get_stage("hubert"), full, cache, {"model": str(tmp_path / "hubert"), "layer": 2, "device": "cpu"}, **quiet)
    kmeans = {"k": 3, "percent": 1.0, "device": "cpu", "backend": "sklearn"}
    fitted = run_stage(get_stage("kmeans"), trial, cache, kmeans, **quiet)
    assert open_stage(fitted.path)["sample_clips"][0] == 3
    refit = run_stage(get_stage("kmeans"), full, cache, kmeans, **quiet)
    assert refit.done == 1 and open_stage(fitted.path)["sample_clips"][0] == 5
    assert "refitting: its clips, or the versions of their upstream clips, changed since the fit (3 clips" in refit.format()

    units = run_stage(get_stage("units"), full, cache, {"top_k": 2}, **quiet)
    clip = table.loc[0, "clip_id"]
    assert open_stage(units.path)[clip]["frame_hist"].shape[0] == int(table.loc[0, "num_frames"]) != 3
    table.loc[0, "num_frames"] = "3"
    table.to_csv(full, index=False)
    again = run_stage(get_stage("units"), full, cache, {"top_k": 2}, **quiet)
    assert (again.done, again.stale, again.cached) == (1, 1, 4)
    assert open_stage(units.path)[clip]["frame_hist"].shape == (3, 3)


def test_a_recomputed_clip_wins_even_when_the_writing_node_s_clock_is_behind(wavs, monkeypatch):
    root, rows, manifest, cache = wavs
    stats = run_stage(AUDIO_STATS, manifest, cache, commit_every=2, progress=False)
    fixed = rows[0]
    quiet = tone(fixed["sr"], fixed["seconds"], 300, 0.01)
    sf.write(os.path.join(root, fixed["audio_path"]), quiet if fixed["channels"] == 1 else np.stack([quiet] * 2, 1), fixed["sr"])
    monkeypatch.setattr(time, "time_ns", lambda: 1_000)  # this node's clock is far behind the first writer's
    assert run_stage(AUDIO_STATS, manifest, cache, progress=False).stale == 1
    assert open_stage(stats.path)[fixed["clip_id"]]["rms_db"].max() < -40  # the new, quiet version
    assert compact_stage(StageDir(stats.path), 10_000_000, "compact-test")[1] == 1
    assert open_stage(stats.path)[fixed["clip_id"]]["rms_db"].max() < -40


def test_two_compactions_at_once_leave_every_clip_once(wavs):
    root, rows, manifest, cache = wavs
    slow = run_stage(SLOW, manifest, cache, commit_every=1, progress=False)
    before = read_all(slow.path)
    command = [sys.executable, "-m", "soundstage.cli", "cache", "compact", "--cache", cache]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert any(p.returncode == 0 for p in procs), outputs
    for p, out in zip(procs, outputs):  # the other one finished first, or was refused while it ran
        assert p.returncode == 0 or "another maintenance command" in out, out
    sd = StageDir(slow.path)
    ids = [cid for path in sd.part_paths() for cid in h5py.File(path, "r")["clip_id"].asstr()[...]]
    assert sorted(ids) == sorted(before) and len(sd.part_paths()) == 1
    after = read_all(slow.path)
    for cid in before:
        np.testing.assert_array_equal(after[cid]["energy"], before[cid]["energy"])


def test_an_interrupted_cache_rm_is_gone_for_readers_and_gc_finishes_it(wavs, tmp_path, monkeypatch):
    import soundstage.cache.gc as cache_gc

    root, rows, manifest, cache = wavs
    cache = str(tmp_path / "cache")
    stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)

    def interrupted(path, *args, **kwargs):  # Ctrl-C (or kill -9) while the files are being deleted
        for name in os.listdir(os.path.join(path, "parts")):
            os.remove(os.path.join(path, "parts", name))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache_gc.shutil, "rmtree", interrupted)
        assert CliRunner().invoke(main, ["cache", "rm", "--cache", cache, stats.fingerprint]).exit_code != 0
    status = CliRunner().invoke(main, ["status", "--cache", cache])
    assert ".removing" not in status.output and stats.fingerprint not in status.output, status.output
    assert list(iter_stage_dirs(cache)) == []  # no reader finds the half-removed output
    (left,) = cache_gc.leftovers(cache)
    assert os.path.basename(left).startswith(".removing-" + stats.fingerprint) and os.path.isdir(left)
    result = CliRunner().invoke(main, ["cache", "gc", "--cache", cache])
    assert result.exit_code == 0 and f"an interrupted removal: audio-stats/{os.path.basename(left)}" in result.output
    assert not os.path.exists(left) and cache_gc.leftovers(cache) == []
