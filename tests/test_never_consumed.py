"""Data that must never be consumed: corrupt part bytes (checked the first time anything reads a
part, the verdict remembered), fits and downstream clips made from upstream clips that were
recomputed since, and old versions of clips whose inputs changed but whose recomputation failed.

The hubert -> kmeans -> units chain runs with a tiny HuBERT built from its config on the
synthetic dataset; the failing-recomputation cases use the engine's toy stages on generated wavs.
"""

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundstage.cache import StageDir, open_stage
from soundstage.cache import digest as digest_module
from soundstage.cache import integrity as integrity_module
from soundstage.cache.dataset import CachedClips
from soundstage.cache.quarantine import CorruptPart, load_verdicts, verdict
from soundstage.cache.reader import StaleClip, read_result
from soundstage.cli import main
from soundstage.pipeline import runner as runner_module
from soundstage.pipeline.runner import run_stage
from soundstage.stages import STAGE_MODULES, get_stage, register_stage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _wavs import make_wavs, write_manifest  # noqa: E402

torch.set_num_threads(1)
QUIET = {"workers": 0, "progress": False, "log": lambda *_: None}
KMEANS = {"k": 4, "percent": 1.0, "device": "cpu"}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """(root, manifest, hubert params) with a hubert cache of 5 clips in parts of 2 clips, pristine:
    tests work on a copy (``fresh``)."""
    from transformers import HubertModel

    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.models.tiny import tiny_hubert_config

    root = tmp_path_factory.mktemp("never")
    manifest = make_synthetic_dataset(str(root / "synth"), clips=5, seed=1, workers=1)
    torch.manual_seed(0)
    HubertModel(tiny_hubert_config()).save_pretrained(root / "hubert")
    params = {"model": str(root / "hubert"), "layer": 2, "device": "cpu"}
    summary = run_stage(get_stage("hubert"), manifest, str(root / "cache"), params, commit_every=2, **QUIET)
    assert summary.ok and summary.done == 5
    return root, manifest, params


def fresh(features, tmp_path) -> str:
    """A copy of the pristine cache of ``features``, for one test to change."""
    root, _, _ = features
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "cache", cache)
    return cache


def only_output(cache, stage) -> StageDir:
    (fp,) = os.listdir(os.path.join(cache, stage))
    return StageDir.at(cache, stage, fp)


def part_clips(path) -> list:
    with h5py.File(path, "r") as h5:
        return h5["clip_id"].asstr()[...].tolist()


def flip_bytes(path, dataset, count=64):
    """Invert ``count`` bytes in the middle of ``dataset`` (a disk or copy error; size unchanged)."""
    with h5py.File(path, "r") as h5:
        ds = h5[dataset]
        start = ds.id.get_offset() + ds.id.get_storage_size() // 2
    with open(path, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(count))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def run(name, manifest, cache, params):
    return run_stage(get_stage(name), manifest, cache, params, **QUIET)


def read_all(reader) -> dict:
    return {cid: reader[cid] for cid in sorted(reader)}


# ------------------------------------------------------------------------ 1. corrupt bytes


def test_corrupt_bytes_are_refused_at_first_read_and_each_part_is_checked_once(features, tmp_path, monkeypatch):
    root, manifest, _ = features
    cache = fresh(features, tmp_path)
    hubert = only_output(cache, "hubert")
    bad, *good = hubert.part_paths()
    bad_clips = part_clips(bad)
    flip_bytes(bad, "features")

    # a downstream stage stops with one line naming the part and saying how to repair it
    result = CliRunner().invoke(
        main, ["kmeans", "--manifest", manifest, "--cache", cache, *"--k 4 --percent 1 --device cpu".split()]
    )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "probably a bug" not in errors[0]
    assert os.path.basename(bad) in errors[0] and f"soundstage verify --repair {hubert.path}" in errors[0]
    assert not os.path.exists(only_output(cache, "kmeans").result_path)  # nothing was fitted on it

    # open_stage and CachedClips refuse it too, naming the part and the clips in it
    with pytest.raises(CorruptPart) as refused:
        open_stage(hubert.path)[bad_clips[0]]
    assert refused.value.part == bad and sorted(refused.value.clips) == sorted(bad_clips)
    assert all(cid in str(refused.value) for cid in bad_clips)
    clips = CachedClips(manifest, {"hubert": hubert.path})
    with pytest.raises(CorruptPart, match=os.path.basename(bad)):
        [clips[i] for i in range(len(clips))]

    # the verdict is remembered per part (name, size, mtime): the next reader does not hash again
    hashed = []
    real = integrity_module.file_problems
    monkeypatch.setattr(integrity_module, "file_problems", lambda path, data=None: hashed.append(path) or real(path, data))
    unread = [p for p in good if not _has_marker(hubert, p)]  # k-means stopped before reading these
    first = open_stage(hubert.path)
    for path in good:
        first[part_clips(path)[0]]
    assert sorted(hashed) == sorted(unread)  # checked at their first read, the others not again
    hashed.clear()
    again = open_stage(hubert.path)
    for path in good:
        for cid in part_clips(path):
            again[cid]
    with pytest.raises(CorruptPart):
        again[bad_clips[0]]
    assert hashed == []  # remembered across readers (processes): no part hashed a second time
    assert all(_has_marker(hubert, p) for p in good)


def _has_marker(sd, path):
    return verdict(load_verdicts(sd), path) == []


def test_a_corrupt_whole_dataset_result_is_refused(features, tmp_path):
    root, manifest, _ = features
    cache = fresh(features, tmp_path)
    km = run("kmeans", manifest, cache, KMEANS)
    flip_bytes(StageDir(km.path).result_path, "centroids", 16)
    with pytest.raises(CorruptPart, match="verify --repair"):
        read_result(km.path)
    with pytest.raises(CorruptPart, match="result.h5"):
        run("units", manifest, cache, {"top_k": 2})


# ------------------------------------------------------- 2. fits keyed by upstream versions


def test_a_fit_and_downstream_clips_follow_recomputed_upstream_clips(features, tmp_path):
    root, manifest, hubert_params = features
    clean = fresh(features, tmp_path / "clean")
    run("kmeans", manifest, clean, KMEANS)
    reference = read_all(open_stage(run("units", manifest, clean, {"top_k": 2}).path))

    cache = fresh(features, tmp_path / "repaired")
    run("kmeans", manifest, cache, KMEANS)
    run("units", manifest, cache, {"top_k": 2})
    hubert = only_output(cache, "hubert")
    bad = hubert.part_paths()[0]
    bad_clips = part_clips(bad)
    flip_bytes(bad, "features")
    # what the issue did next: k-means over the damaged features (refused now; see the test above)
    try:
        run("kmeans", manifest, cache, {**KMEANS, "seed": 1})
    except CorruptPart:
        pass
    repaired = CliRunner().invoke(main, ["verify", "--repair", hubert.path])
    assert repaired.exit_code == 0, repaired.output
    rerun = run("hubert", manifest, cache, hubert_params)
    assert rerun.done == len(bad_clips)

    # the fit read upstream clips that were recomputed since: it is stale, whatever their inputs
    km = run("kmeans", manifest, cache, KMEANS)
    assert (km.done, km.cached) == (1, 0), km.format()
    units = run("units", manifest, cache, {"top_k": 2})
    assert units.done >= rerun.done  # the clips whose features were recomputed, at least
    after = read_all(open_stage(units.path))
    assert sorted(after) == sorted(reference)
    for cid in reference:
        for name, value in reference[cid].items():
            np.testing.assert_array_equal(after[cid][name], value, err_msg=f"{cid} {name}")


# -------------------------------------------- 3. a stale clip whose recomputation failed


@pytest.fixture
def toy_sum():
    register_stage("toy-sum", "engine_stages:SUM")
    yield get_stage("toy-sum")
    STAGE_MODULES.pop("toy-sum", None)


def test_a_stale_clip_whose_recomputation_failed_is_never_served(tmp_path, toy_sum, monkeypatch):
    root = str(tmp_path / "data")
    rows = make_wavs(root, n=4)
    manifest, cache = write_manifest(root, rows), str(tmp_path / "c")
    stats = run_stage(get_stage("audio-stats"), manifest, cache, **QUIET)
    total = run_stage(toy_sum, manifest, cache, **QUIET)
    victim = rows[1]["clip_id"]
    audio = os.path.join(root, rows[1]["audio_path"])
    original = open(audio, "rb").read()
    with open(audio, "wb") as f:  # its input changed, and can no longer be computed
        f.write(b"not a wav")

    again = run_stage(get_stage("audio-stats"), manifest, cache, **QUIET)
    assert (again.stale, len(again.failed)) == (1, 1)
    reader = open_stage(stats.path)
    assert victim not in reader and len(reader) == len(rows) - 1 and victim not in list(reader)
    with pytest.raises(StaleClip, match="unreadable audio"):
        reader[victim]
    with pytest.raises(KeyError, match=f"{victim}: .*unreadable audio"):
        CachedClips(manifest, {"stats": stats.path})
    kept = CachedClips(manifest, {"stats": stats.path}, missing="drop", log=lambda *_: None)
    assert victim not in [row["clip_id"] for row in kept.rows] and len(kept) == len(rows) - 1
    status = CliRunner().invoke(main, ["status", "--cache", cache, "--json"])
    counts = {r["stage"]: (r["done"], r["failed"]) for r in json.loads(status.output)}
    assert counts["audio-stats"] == (len(rows) - 1, 1)

    # downstream: the clip that read the old version is not current either
    down = run_stage(toy_sum, manifest, cache, **QUIET)
    assert (down.stale, len(down.failed)) == (1, 1)
    with pytest.raises(StaleClip):
        open_stage(total.path)[victim]

    # the withdrawal is recorded before the recomputation: a run that dies first serves nothing old
    with open(audio, "wb") as f:
        f.write(original)
    other = rows[2]["clip_id"]
    os.utime(os.path.join(root, rows[2]["audio_path"]), ns=(1, 1))  # rewritten: stale, not recomputed yet
    monkeypatch.setattr(runner_module, "_process_clips", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_stage(get_stage("audio-stats"), manifest, cache, **QUIET)
    with pytest.raises(StaleClip, match="not been recomputed yet"):
        open_stage(stats.path)[other]
    monkeypatch.undo()
    fixed = run_stage(get_stage("audio-stats"), manifest, cache, **QUIET)
    assert (fixed.done, fixed.failed) == (2, [])
    assert {victim, other} <= set(open_stage(stats.path)) and open_stage(stats.path)[victim]["rms_db"].size
    assert run_stage(toy_sum, manifest, cache, **QUIET).done == 2 and victim in open_stage(total.path)


# ------------------------------------------------ 11. content digests for same size + mtime


def test_content_digest_notices_a_replacement_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDSTAGE_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setenv("SOUNDSTAGE_INPUT_DIGEST", "stat")  # restored after the test: the CLI option below sets it
    root = str(tmp_path / "data")
    rows = make_wavs(root, n=3)
    manifest, cache = write_manifest(root, rows), str(tmp_path / "c")
    stats = get_stage("audio-stats")
    run_stage(stats, manifest, cache, **QUIET)

    def replace_keeping_size_and_mtime(row):
        path = os.path.join(root, row["audio_path"])
        st = os.stat(path)
        data = bytearray(open(path, "rb").read())
        data[-4096:] = bytes(b ^ 0x55 for b in data[-4096:])  # other samples, same header and length
        with open(path, "wb") as f:
            f.write(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.path.getsize(path) == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
        return path

    replace_keeping_size_and_mtime(rows[0])
    assert run_stage(stats, manifest, cache, **QUIET).stale == 0  # size + mtime cannot see it

    args = ["audio-stats", "--manifest", manifest, "--cache", cache, "--workers", "0", "--no-progress"]
    switched = CliRunner().invoke(main, [*args, "--input-digest", "content"])
    assert switched.exit_code == 0 and "stale 3" in switched.output, switched.output  # every digest changed once
    hashed = []
    real = digest_module.file_hash
    monkeypatch.setattr(digest_module, "file_hash", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(digest_module, "CONTENT_HASHES", digest_module.ContentHashes())  # as a new process
    monkeypatch.setenv("SOUNDSTAGE_INPUT_DIGEST", "content")
    assert run_stage(stats, manifest, cache, **QUIET).cached == 3 and hashed == []  # looked up, not hashed again
    changed = replace_keeping_size_and_mtime(rows[1])
    again = run_stage(stats, manifest, cache, **QUIET)
    assert (again.stale, again.done) == (1, 1) and hashed == [changed]
    fresh = open_stage(run_stage(stats, manifest, str(tmp_path / "fresh"), **QUIET).path)
    np.testing.assert_array_equal(open_stage(again.path)[rows[1]["clip_id"]]["rms_db"], fresh[rows[1]["clip_id"]]["rms_db"])
