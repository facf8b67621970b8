"""Executors without a cluster: local parallel shards, what a (re)launch would submit, stopping on failures."""

import os
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from soundstage.cache import StageDir, open_stage
from soundstage.cli import main
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import read_manifest, write_manifest
from soundstage.pipeline.executors import run_pipeline
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.pipeline.resolve import expected_fingerprint
from soundstage.pipeline.runner import manifest_rows, run_stage
from soundstage.pipeline.shard import shard_of
from soundstage.stages import get_stage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_site"))
import soundstage_test_stages  # noqa: E402

soundstage_test_stages.register()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), clips=10, seed=7, workers=1)


def _pipeline(tmp_path, manifest, stages="  audio-stats: {}\n  test-loudest: {}\n  test-mean: {}\n"):
    path = tmp_path / "p.yaml"
    path.write_text(f"manifest: {manifest}\ncache: cache\nresources: {{time: '0:05:00'}}\nstages:\n{stages}")
    return str(path)


def _scripts(output):
    """sbatch line -> script text, from a dry run's output."""
    blocks = re.split(r"^# --- ", output, flags=re.MULTILINE)[1:]
    return {b.splitlines()[0]: "\n".join(b.splitlines()[1:]) for b in blocks}


def test_dry_run_chains_stages_and_runs_a_global_stage_as_one_job(dataset, tmp_path):
    path = _pipeline(tmp_path, dataset)
    r = CliRunner().invoke(main, ["run", path, "--executor", "slurm", "--shards", "3", "--dry-run"])
    assert r.exit_code == 0, r.output
    scripts = _scripts(r.output)
    heads = list(scripts)
    assert [h.split(":")[0] for h in heads] == ["soundstage-audio-stats", "soundstage-test-loudest", "soundstage-test-mean"]
    assert "--dependency" not in heads[0]
    assert (
        "--dependency=afterok:<soundstage-audio-stats>" in heads[1]
        and "--dependency=afterok:<soundstage-audio-stats>" in heads[2]
    )
    stats, loudest, mean = scripts.values()
    assert "#SBATCH --array=0-2" in stats and "#SBATCH --array=0-2" in loudest
    assert "--array" not in mean and "--shard" not in mean and "%j.out" in mean
    fp = expected_fingerprint("audio-stats", load_pipeline(path).stages)
    assert f"--audio-stats {fp}" in loudest  # the downstream reads exactly the upstream output of this file
    assert not (tmp_path / "cache").exists()


def test_relaunch_submits_only_shards_with_missing_clips(dataset, tmp_path):
    path = _pipeline(tmp_path, dataset, stages="  audio-stats: {}\n")
    stage = get_stage("audio-stats")
    run_stage(stage, dataset, str(tmp_path / "cache"), {}, shard=(1, 3), progress=False)
    ids = [r["clip_id"] for r in manifest_rows(dataset)[0]]
    for shards in (3, 4):  # the shard count may change between launches
        r = CliRunner().invoke(main, ["run", path, "--executor", "slurm", "--shards", str(shards), "--dry-run"])
        assert r.exit_code == 0, r.output
        (script,) = _scripts(r.output).values()
        wanted = sorted({shard_of(c, shards) for c in ids if shard_of(c, 3) != 1})
        spec = re.search(r"#SBATCH --array=(\S+)", script).group(1)
        got = sorted(int(x) for part in spec.split(",") for x in _expand(part))
        assert got == wanted


def _expand(part):
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def test_local_parallel_shards_equal_one_process(dataset, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    r = CliRunner().invoke(main, ["run", _pipeline(one, dataset)])
    assert r.exit_code == 0, r.output
    two = tmp_path / "two"
    two.mkdir()
    r = CliRunner().invoke(main, ["run", _pipeline(two, dataset), "--jobs", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output
    for stage in ("audio-stats", "test-loudest"):
        (fp,) = os.listdir(one / "cache" / stage)
        a, b = open_stage(str(one / "cache" / stage / fp)), open_stage(str(two / "cache" / stage / fp))
        assert sorted(a) == sorted(b) and len(a) == 10
        for cid in a:
            for field in a[cid]:
                np.testing.assert_array_equal(a[cid][field], b[cid][field])
    (fp,) = os.listdir(one / "cache" / "test-mean")
    from soundstage.cache import read_result

    res = read_result(str(two / "cache" / "test-mean" / fp))
    stats = open_stage(str(one / "cache" / "audio-stats" / os.listdir(one / "cache" / "audio-stats")[0]))
    assert res["mean_rms_db"][0] == pytest.approx(np.mean([np.mean(stats[c]["rms_db"]) for c in stats]))


def test_local_run_goes_on_past_failed_clips_and_says_so(dataset, tmp_path):
    df = read_manifest(dataset)
    broken_audio = tmp_path / "broken.wav"
    broken_audio.write_bytes(b"not a wav file at all")
    df.loc[0, "audio_path"] = str(broken_audio)
    manifest = str(tmp_path / "manifest.csv")
    for col in ("audio_path", "frames_dir", "labels_rgb_dir", "labels_semantic_dir", "label2idx_path"):
        df[col] = [v if not v or os.path.isabs(v) else os.path.join(os.path.dirname(dataset), v) for v in df[col]]
    write_manifest(df, manifest)
    pipe = load_pipeline(_pipeline(tmp_path, manifest))
    lines = []
    code = run_pipeline(pipe, None, executor="local", out=lines.append)
    text = "\n".join(lines)
    assert code == 1 and "failed 1" in text and "unreadable audio" in text
    assert "note: 1 clip(s) failed in audio-stats" in text
    bad = df.loc[0, "clip_id"]
    sd = StageDir.at(str(tmp_path / "cache"), "audio-stats", expected_fingerprint("audio-stats", pipe.stages))
    assert len(sd.committed_ids()) == 9 and list(sd.failures()) == [bad]
    # the stages below ran on every other clip and record the bad one with a clear cause
    loudest = StageDir.at(str(tmp_path / "cache"), "test-loudest", expected_fingerprint("test-loudest", pipe.stages))
    assert len(loudest.committed_ids()) == 9 and bad not in loudest.committed_ids()
    assert loudest.failures()[bad]["cause"].startswith(f"MissingClip: no audio-stats output for clip {bad}")
    mean = StageDir.at(str(tmp_path / "cache"), "test-mean", expected_fingerprint("test-mean", pipe.stages))
    assert os.path.exists(mean.result_path)
