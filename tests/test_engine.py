"""The stage engine and the HDF5 cache: resume, crash safety, locking, failures, reuse, reading."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from soundstage.cache import StageDir, open_stage
from soundstage.cache.dataset import CachedClips
from soundstage.cache.locks import ShardCountConflict
from soundstage.cache.maintenance import compact_stage, verify_stage
from soundstage.cache.store import ShardLocked
from soundstage.cli import main
from soundstage.pipeline.cli import stage_command
from soundstage.pipeline.local import run_local
from soundstage.pipeline.resolve import UpstreamError
from soundstage.pipeline.runner import pending_clips, run_stage
from soundstage.pipeline.shard import select_shard
from soundstage.stages import STAGE_MODULES, get_stage, register_stage

sys.path.insert(0, os.path.dirname(__file__))
from _wavs import make_wavs, write_manifest  # noqa: E402
from engine_stages import FRAGILE, SLOW  # noqa: E402

AUDIO_STATS = get_stage("audio-stats")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    rows = make_wavs(str(root), n=12)
    return str(root), rows


@pytest.fixture
def toy_registered():
    register_stage("toy-sum", "engine_stages:SUM")
    yield
    STAGE_MODULES.pop("toy-sum", None)


def read_all(stage_dir):
    reader = open_stage(stage_dir)
    return {cid: reader[cid] for cid in sorted(reader)}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for cid in a:
        for field, value in a[cid].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[cid][field])
            else:
                assert value == b[cid][field]


def test_audio_stats_values_match_independent_computation(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    summary = run_stage(AUDIO_STATS, manifest, str(tmp_path / "cache"), workers=2, progress=False)
    assert summary.ok and summary.done == len(rows)
    reader = open_stage(summary.path)
    for r in rows:
        got = reader[r["clip_id"]]
        info = sf.info(os.path.join(root, r["audio_path"]))
        assert got["sample_rate"] == info.samplerate == r["sr"]
        assert got["channels"] == info.channels == r["channels"]
        assert got["duration"] == pytest.approx(info.frames / info.samplerate)
        # a sine of amplitude A has RMS A/sqrt(2), whatever the rate it is resampled from
        expected_db = 20 * np.log10(r["amp"] / np.sqrt(2))
        assert len(got["rms_db"]) == r["seconds"]
        np.testing.assert_allclose(got["rms_db"], expected_db, atol=0.05)
        assert not got["silent"].any()


def test_failures_are_recorded_and_nothing_else_is_lost(wavs, tmp_path):
    root, rows = wavs
    bad = [
        {"clip_id": "zero", "audio_path": "zero.wav"},
        {"clip_id": "garbage", "audio_path": "garbage.wav"},
        {"clip_id": "gone", "audio_path": "nowhere.wav"},
        {"clip_id": "truncated", "audio_path": "truncated.wav"},
        {"clip_id": rows[0]["clip_id"], "audio_path": rows[0]["audio_path"]},  # duplicate row
    ]
    open(os.path.join(root, "zero.wav"), "wb").close()
    with open(os.path.join(root, "garbage.wav"), "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with open(os.path.join(root, rows[1]["audio_path"]), "rb") as f:
        head = f.read(30)  # header promises data that is not there
    with open(os.path.join(root, "truncated.wav"), "wb") as f:
        f.write(head)
    manifest = write_manifest(root, rows + bad, "faulty.csv")
    summary = run_stage(AUDIO_STATS, manifest, str(tmp_path / "cache"), workers=2, progress=False)
    failed = dict(summary.failed)
    assert set(failed) == {"zero", "garbage", "gone", "truncated", rows[0]["clip_id"]}
    assert "zero-byte" in failed["zero"] and "missing" in failed["gone"]
    assert "duplicate clip_id" in failed[rows[0]["clip_id"]]
    assert summary.exit_code == 1 and summary.done == len(rows)
    reader = open_stage(summary.path)
    assert sorted(reader) == sorted(r["clip_id"] for r in rows)
    records = StageDir(summary.path).failures()
    assert set(records) == set(failed)
    # the CLI says so too, with a nonzero exit status
    result = CliRunner().invoke(
        main, ["audio-stats", "--manifest", manifest, "--cache", str(tmp_path / "cache"), "--workers", "0"]
    )
    assert result.exit_code == 1 and "failed zero: zero-byte audio" in result.output
    # pipeline jobs: recorded clip failures alone do not fail the job (the stages below go on)
    result = CliRunner().invoke(
        main,
        ["audio-stats", "--manifest", manifest, "--cache", str(tmp_path / "cache"), "--workers", "0", "--allow-failed-clips"],
    )
    assert result.exit_code == 0 and "failed zero: zero-byte audio" in result.output


def test_a_failing_batch_is_split_to_find_the_culprit(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    summary = run_stage(FRAGILE, manifest, str(tmp_path / "c"), progress=False)
    long_ids = {r["clip_id"] for r in rows if r["seconds"] > 6}
    assert {cid for cid, _ in summary.failed} == long_ids
    assert all("model exploded" in cause for _, cause in summary.failed)
    assert summary.done == len(rows) - len(long_ids)


def test_larger_manifest_computes_only_new_clips_and_moving_keeps_cache(wavs, tmp_path):
    root, rows = wavs
    small = write_manifest(root, rows[:5], "small.csv")
    big = write_manifest(root, rows, "big.csv")
    cache = str(tmp_path / "cache")
    first = run_stage(AUDIO_STATS, small, cache, progress=False)
    second = run_stage(AUDIO_STATS, big, cache, progress=False)
    assert (second.cached, second.done) == (5, len(rows) - 5)
    assert first.fingerprint == second.fingerprint
    before = read_all(second.path)
    moved = str(tmp_path / "elsewhere" / "cache")
    shutil.move(cache, moved)
    third = run_stage(AUDIO_STATS, big, moved, progress=False)
    assert third.fingerprint == first.fingerprint and third.done == 0 and third.cached == len(rows)
    assert_same(before, read_all(third.path))
    assert verify_stage(StageDir(third.path))[0] == []


def test_fingerprint_ignores_runtime_options_but_not_parameters(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows[:4])
    a = run_stage(SLOW, manifest, str(tmp_path / "a"), {"sleep": 0.0}, batch_size=1, progress=False)
    b = run_local(SLOW, manifest, str(tmp_path / "b"), {"sleep": 0.001}, jobs=2, batch_size=3, workers=1, progress=False)
    c = run_stage(SLOW, manifest, str(tmp_path / "c"), {"scale": 2.0}, progress=False)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    loud = {r["clip_id"] for r in rows[:4] if r["amp"] > 0.12}
    assert loud and {cid for cid, _ in a.warnings} == loud and "2 done clip(s) with warnings" in a.format()
    assert b.done == 4
    assert_same(read_all(a.path), read_all(b.path))
    energy_a = read_all(a.path)[rows[0]["clip_id"]]["energy"].astype(np.float32)
    energy_c = read_all(c.path)[rows[0]["clip_id"]]["energy"].astype(np.float32)
    np.testing.assert_allclose(energy_c, 2 * energy_a, rtol=2e-3)


def test_shards_partition_the_manifest_and_may_change_between_runs(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    ids = [r["clip_id"] for r in rows]
    for n in (2, 3, 5):
        parts = [{r["clip_id"] for r in select_shard([{"clip_id": i} for i in ids], k, n)} for k in range(n)]
        assert sum(len(p) for p in parts) == len(ids) and set().union(*parts) == set(ids)
    cache = str(tmp_path / "cache")
    s0 = run_stage(AUDIO_STATS, manifest, cache, shard=(0, 3), progress=False)
    assert pending_clips(AUDIO_STATS, {}, manifest, cache, shard=(0, 3)) == 0
    rest = [run_stage(AUDIO_STATS, manifest, cache, shard=(k, 2), progress=False) for k in range(2)]
    assert s0.done + sum(s.done for s in rest) == len(ids)
    assert sum(s.cached for s in rest) == s0.done
    assert pending_clips(AUDIO_STATS, {}, manifest, cache) == 0


def test_slurm_array_variables_select_the_shard(wavs, tmp_path, monkeypatch):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    summary = run_stage(AUDIO_STATS, manifest, str(tmp_path / "c"), progress=False)
    assert summary.shard == (1, 4)
    assert summary.selected == len(select_shard(rows, 1, 4))


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from engine_stages import SLOW
from soundstage.pipeline.runner import run_stage
s = run_stage(SLOW, {manifest!r}, {cache!r}, {{"sleep": 0.15}}, workers={workers}, commit_every=2, progress=False)
print(s.format())
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(wavs, tmp_path, workers):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    reference = run_stage(SLOW, manifest, str(tmp_path / "ref"), progress=False)
    cache = str(tmp_path / "killed")
    script = KILL_SCRIPT.format(tests=HERE, manifest=manifest, cache=cache, workers=workers)
    rng = random.Random(workers)
    sd = StageDir(os.path.join(cache, "toy-slow", reference.fingerprint))
    progress = []
    for _ in range(3):  # kill -9 at a random moment after some progress: runner and workers together
        before = len(sd.committed_ids()) if sd.exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if sd.exists() and len(sd.committed_ids()) > before:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        progress.append(len(sd.committed_ids()) if sd.exists() else 0)
    assert any(0 < n < len(rows) for n in progress), f"no kill landed mid-run: {progress}"
    final = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert f"already cached {progress[-1]}" in final.stdout
    assert_same(reference and read_all(reference.path), read_all(os.path.join(cache, "toy-slow", reference.fingerprint)))
    problems, _notes, clips = verify_stage(StageDir(os.path.join(cache, "toy-slow", reference.fingerprint)))
    assert problems == [] and clips == len(rows)


def test_sigterm_commits_finished_clips_and_rerun_completes(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    cache = str(tmp_path / "c")
    script = KILL_SCRIPT.format(tests=HERE, manifest=manifest, cache=cache, workers=0).replace('"sleep": 0.15', '"sleep": 0.3')
    script = script.replace("commit_every=2", "commit_every=1000")
    markers = tmp_path / "markers"
    markers.mkdir()
    script = script.replace('"sleep": 0.3', f'"sleep": 0.3, "marker_dir": {str(markers)!r}')
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(600):  # wait until two batches are finished (not committed: commit_every=1000)
        if len(list(markers.iterdir())) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "INTERRUPTED" in out
    done_before = len(open_stage(os.path.join(cache, "toy-slow", out.split()[1].rstrip(":"))))
    assert 0 < done_before < len(rows)  # committed despite commit_every=1000
    again = run_stage(SLOW, manifest, cache, progress=False)
    assert again.cached == done_before and again.done == len(rows) - done_before


def test_second_writer_on_a_shard_is_refused(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    cache = str(tmp_path / "c")
    script = KILL_SCRIPT.format(tests=HERE, manifest=manifest, cache=cache, workers=0).replace('"sleep": 0.15', '"sleep": 0.5')
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fp = run_stage(SLOW, manifest, str(tmp_path / "probe"), {"sleep": 0.0}, shard=(0, 1000), progress=False).fingerprint
        lock = os.path.join(cache, "toy-slow", fp, "locks", "shard-0-of-1.lock")
        for _ in range(100):
            if os.path.exists(lock) and os.path.getsize(lock):
                break
            time.sleep(0.1)
        with pytest.raises(ShardLocked, match="another writer holds"):
            run_stage(SLOW, manifest, cache, progress=False)
        cmd = stage_command(SLOW)
        result = CliRunner().invoke(cmd, ["--manifest", manifest, "--cache", cache, "--workers", "0"])
        assert result.exit_code != 0 and "another writer holds" in result.output
        # a shard of another count overlaps the running one: refused, so no clip is computed twice
        with pytest.raises(ShardCountConflict, match="a writer with 1 shards is running"):
            run_stage(SLOW, manifest, cache, shard=(1, 2), progress=False)
    finally:
        proc.kill()
        proc.wait()


def test_upstream_choice(wavs, tmp_path, toy_registered):
    root, rows = wavs
    manifest = write_manifest(root, rows[:4])
    cache = str(tmp_path / "c")
    toy_sum = get_stage("toy-sum")
    with pytest.raises(UpstreamError, match="run `soundstage audio-stats` first"):
        run_stage(toy_sum, manifest, cache, progress=False)
    run_stage(AUDIO_STATS, manifest, cache, progress=False)
    messages = []
    one = run_stage(toy_sum, manifest, cache, progress=False, log=messages.append)
    assert any("using the only audio-stats output" in m for m in messages)
    stats_fp = StageDir(one.path).meta()["upstream"]["stats"]["fingerprint"]
    stats = open_stage(os.path.join(cache, "audio-stats", stats_fp))
    sums = open_stage(one.path)
    for cid in sums:
        assert sums[cid]["total"] == pytest.approx(float(np.sum(stats[cid]["rms_db"])))
    run_stage(AUDIO_STATS, manifest, cache, {"silence_db": -40.0}, progress=False)
    with pytest.raises(UpstreamError, match="2 audio-stats outputs"):
        run_stage(toy_sum, manifest, cache, progress=False)
    chosen = run_stage(toy_sum, manifest, cache, upstream_select={"audio-stats": "silence_db=-40"}, progress=False)
    assert chosen.fingerprint != one.fingerprint
    # a changed downstream parameter reuses the upstream as it is
    again = run_stage(
        toy_sum,
        manifest,
        cache,
        {"fail_on": rows[0]["clip_id"]},
        upstream_select={"audio-stats": "silence_db=-60"},
        progress=False,
    )
    assert [c for c, _ in again.failed] == [rows[0]["clip_id"]]
    result = CliRunner().invoke(
        main, ["toy-sum", "--manifest", manifest, "--cache", cache, "--audio-stats", "silence_db=-40", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "already cached 4" in result.output


def test_verify_names_corruption_and_compact_keeps_every_clip(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    summary = run_stage(SLOW, manifest, str(tmp_path / "c"), commit_every=3, progress=False)
    sd = StageDir(summary.path)
    before = read_all(sd.path)
    assert len(sd.part_paths()) == 4
    n_before, n_after = compact_stage(sd, target_bytes=10_000_000, writer_id="compact-test")
    assert (n_before, n_after) == (4, 1)
    assert_same(before, read_all(sd.path))
    assert verify_stage(sd)[0] == []
    # flip bytes in the middle of a dataset: verify names the part and what is wrong
    part = sd.part_paths()[0]
    with h5py.File(part, "r") as h5:
        offset = h5["peak"].id.get_offset()
    with open(part, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xff\xff\xff")
    problems = verify_stage(sd)[0]
    assert any("checksum mismatch in peak" in p for p in problems)
    result = CliRunner().invoke(main, ["verify", "--cache", str(tmp_path / "c")])
    assert result.exit_code == 1 and "checksum mismatch" in result.output
    with open(part, "r+b") as f:
        f.truncate(100)
    assert any("does not open" in p for p in verify_stage(sd)[0])


def test_part_files_are_packed_columns_readable_by_plain_h5py(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    summary = run_stage(SLOW, manifest, str(tmp_path / "c"), progress=False)
    reader = open_stage(summary.path)
    (part,) = StageDir(summary.path).part_paths()
    with h5py.File(part, "r") as h5:
        assert set(h5.keys()) == {"clip_id", "energy", "peak", "label", "pairs", "offsets", "input_digest", "version", "utf8"}
        assert h5["energy"].dtype == np.float16 and h5["energy"].ndim == 1
        ids = h5["clip_id"].asstr()[...]
        off = h5["offsets/energy"][...]
        k = 5
        np.testing.assert_array_equal(h5["energy"][off[k] : off[k + 1]], reader[ids[k]]["energy"])
        assert h5["label"].asstr()[k] == reader[ids[k]]["label"]
        assert h5["pairs"].shape[1] == 2 and reader[ids[k]]["pairs"].shape[1] == 2
        assert json.loads(h5.attrs["fields"])[0]["name"] == "energy"


def test_status_lists_outputs(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    cache = str(tmp_path / "c")
    run_stage(AUDIO_STATS, manifest, cache, progress=False)
    result = CliRunner().invoke(main, ["status", "--cache", cache, "--json"])
    (entry,) = json.loads(result.output)
    assert entry["stage"] == "audio-stats" and entry["done"] == len(rows) and entry["failed"] == 0
    assert entry["params"] == {"silence_db": -60.0} and entry["bytes"] > 0


def test_dataset_joins_manifest_and_caches_in_dataloader_workers(wavs, tmp_path):
    root, rows = wavs
    manifest = write_manifest(root, rows)
    cache = str(tmp_path / "c")
    stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)
    slow = run_stage(SLOW, manifest, cache, progress=False)
    ds = CachedClips(manifest, {"stats": stats.path, "slow": slow.path}, fields={"slow": ["energy"]})
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    seen = {item["clip_id"]: item for item in loader}
    assert len(seen) == len(rows)
    direct = open_stage(slow.path)
    for cid, item in seen.items():
        assert set(item["slow"]) == {"energy"}
        np.testing.assert_array_equal(item["slow"]["energy"].numpy(), direct[cid]["energy"])
        assert int(item["stats"]["sample_rate"]) == int(item["row"]["sr"])
    # a manifest clip that is not in a cache is an error unless dropped explicitly
    extra = write_manifest(root, rows + [{"clip_id": "not-computed", "audio_path": "x.wav"}], "extra.csv")
    with pytest.raises(KeyError, match="missing from the cache"):
        CachedClips(extra, {"stats": stats.path})
    assert len(CachedClips(extra, {"stats": stats.path}, missing="drop", log=lambda *_: None)) == len(rows)


def test_global_stage_result_is_cached_and_verified(wavs, tmp_path):
    register_stage("toy-mean", "engine_stages:MEAN")
    try:
        root, rows = wavs
        manifest = write_manifest(root, rows)
        cache = str(tmp_path / "c")
        stats = run_stage(AUDIO_STATS, manifest, cache, progress=False)
        first = run_stage(get_stage("toy-mean"), manifest, cache, progress=False)
        again = run_stage(get_stage("toy-mean"), manifest, cache, progress=False)
        assert (first.done, again.done, again.cached) == (1, 0, 1)
        result = open_stage(first.path)
        reader = open_stage(stats.path)
        expected = np.concatenate([reader[c]["rms_db"] for c in reader]).mean()
        assert result["mean_db"][0] == pytest.approx(expected)
        assert verify_stage(StageDir(first.path))[0] == []
        path = StageDir(first.path).result_path
        with h5py.File(path, "r") as h5:
            offset = h5["mean_db"].id.get_offset()
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01\x02\x03\x04")
        assert any("checksum mismatch in mean_db" in p for p in verify_stage(StageDir(first.path))[0])
    finally:
        STAGE_MODULES.pop("toy-mean", None)


def test_a_clip_missing_upstream_fails_with_a_clear_cause(wavs, tmp_path, toy_registered):
    root, rows = wavs
    cache = str(tmp_path / "c")
    run_stage(AUDIO_STATS, write_manifest(root, rows[:3], "three.csv"), cache, progress=False)
    summary = run_stage(get_stage("toy-sum"), write_manifest(root, rows[:4], "four.csv"), cache, progress=False)
    assert summary.done == 3
    ((cid, cause),) = summary.failed
    assert cid == rows[3]["clip_id"] and cause.startswith(f"MissingClip: no audio-stats output for clip {cid}")


def test_model_identity_follows_content_not_path(tmp_path, monkeypatch):
    from soundstage.pipeline.identity import model_identity

    ckpt = tmp_path / "a" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights-1")
    first = model_identity(str(ckpt))
    moved = tmp_path / "b" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    assert model_identity(str(moved)) == first
    moved.write_bytes(b"weights-2")
    assert model_identity(str(moved)) != first
    model_dir = tmp_path / "dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"w")
    copy = tmp_path / "dir2"
    shutil.copytree(model_dir, copy)
    assert model_identity(str(model_dir)) == model_identity(str(copy))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    assert model_identity("org/not-cached-model") == {"hub_id": "org/not-cached-model", "revision": None}
