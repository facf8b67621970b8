"""The pipeline file: loading, path resolution, dependency order, `soundstage run` and `--config`."""

import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from soundstage.cache import open_stage
from soundstage.cli import main
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.pipeline import pipeline_file
from soundstage.pipeline.pipeline_file import PipelineError, dependency_order, load_pipeline
from soundstage.pipeline.resolve import expected_fingerprint
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import Stage, Upstream
from soundstage.stages import get_stage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_site"))
import soundstage_test_stages  # noqa: E402

soundstage_test_stages.register()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), clips=6, seed=5, workers=1)


def test_paths_resolve_against_the_file_and_defaults_merge(tmp_path):
    exp = tmp_path / "exp"
    (exp / "models" / "tiny").mkdir(parents=True)
    (exp / "models" / "tiny" / "config.json").write_text("{}")
    path = exp / "p.yaml"
    path.write_text("""
manifest: data/manifest.csv
cache: ../cache
shards: 4
resources: {time: "01:00:00", partition: cpu}
stages:
  audio-stats: {silence-db: -50}
  hubert:
    model: models/tiny
    layer: 2
    shards: 8
    resources: {gpus: 1, partition: gpu}
""")
    pipe = load_pipeline(str(path))
    assert pipe.manifest == str(exp / "data" / "manifest.csv")
    assert pipe.cache == str(tmp_path / "cache")
    assert pipe.stages == {"audio-stats": {"silence_db": -50}, "hubert": {"model": str(exp / "models" / "tiny"), "layer": 2}}
    assert pipe.resources["hubert"] == {"time": "01:00:00", "partition": "gpu", "gpus": 1}
    assert pipe.resources["audio-stats"] == pipe.resources["kmeans"] == {"time": "01:00:00", "partition": "cpu"}
    assert (pipe.shards["hubert"], pipe.shards["audio-stats"], pipe.shards["beats"]) == (8, 4, 4)

    # a model name that is not a path next to the file is a hub id and stays as written;
    # any other parameter naming a file next to the pipeline file resolves like the models
    (exp / "label2idx.json").write_text("{}")
    path.write_text(
        "stages:\n  hubert: {model: facebook/hubert-base-ls960}\n"
        "  sources: {vocabulary: label2idx.json, llm_endpoint: 'http://gpu7:8000'}\n"
    )
    pipe = load_pipeline(str(path))
    assert pipe.stages["hubert"]["model"] == "facebook/hubert-base-ls960" and pipe.manifest is None
    assert pipe.stages["sources"] == {"vocabulary": str(exp / "label2idx.json"), "llm_endpoint": "http://gpu7:8000"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages:\n  audio-stats: {silence: -50}\n", "no parameter 'silence'"),
        ("stages:\n  audiostats: {}\n", "unknown stage 'audiostats'"),
        ("manifest: m.csv\nstage: {}\n", "unknown key"),
        ("executor: cloud\n", "executor must be local or slurm"),
    ],
)
def test_mistakes_in_the_file_are_reported(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message):
        load_pipeline(str(path))


def test_dependency_order_puts_upstream_first_and_finds_cycles(monkeypatch):
    assert dependency_order(["sources"]) == ["caption", "sources"]
    assert dependency_order(["test-loudest", "audio-stats"]) == ["audio-stats", "test-loudest"]

    def noop(*_):
        return []

    loop = {
        n: Stage(name=n, version=1, upstream=[Upstream("x", m)], load=noop, process=noop) for n, m in (("a", "b"), ("b", "a"))
    }
    monkeypatch.setitem(pipeline_file.STAGE_MODULES, "a", "unused")
    monkeypatch.setitem(pipeline_file.STAGE_MODULES, "b", "unused")
    monkeypatch.setattr(pipeline_file, "get_stage", loop.__getitem__)
    with pytest.raises(PipelineError, match="cycle: a -> b -> a"):
        dependency_order(["a"])


def _pipeline(tmp_path, dataset, offset=1.5):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"manifest: {dataset}\ncache: cache\nstages:\n"
        f"  audio-stats: {{silence_db: -45}}\n  test-loudest: {{offset_db: {offset}}}\n"
    )
    return str(path)


def test_run_computes_upstream_first_then_skips_what_the_cache_holds(dataset, tmp_path):
    path = _pipeline(tmp_path, dataset)
    result = CliRunner().invoke(main, ["run", path, "test-loudest"])
    assert result.exit_code == 0, result.output
    cache = str(tmp_path / "cache")  # relative to the file

    # independent reference: the stages run directly through the runner
    ref = str(tmp_path / "ref")
    stats = run_stage(get_stage("audio-stats"), dataset, ref, {"silence_db": -45}, progress=False)
    loud = run_stage(get_stage("test-loudest"), dataset, ref, {"offset_db": 1.5}, progress=False)
    for summary in (stats, loud):
        got = open_stage(os.path.join(cache, summary.stage, summary.fingerprint))
        want = open_stage(summary.path)
        assert sorted(got) == sorted(want) and len(got) == 6
        for cid in want:
            for field, value in want[cid].items():
                np.testing.assert_array_equal(got[cid][field], value)
    rms = open_stage(stats.path)
    for cid, rec in open_stage(loud.path).items():
        assert rec["second"] == np.argmax(rms[cid]["rms_db"])
        assert rec["rms_db"] == pytest.approx(rms[cid]["rms_db"].max() + 1.5, abs=1e-4)

    again = CliRunner().invoke(main, ["run", path])
    assert again.exit_code == 0 and again.output.count("complete in the cache, skipped") == 2, again.output

    # a changed downstream parameter recomputes only the downstream stage
    changed = CliRunner().invoke(main, ["run", _pipeline(tmp_path, dataset, offset=3.0)])
    assert changed.exit_code == 0
    assert "audio-stats" in changed.output.split("skipped")[0] and "test-loudest" in changed.output.split("skipped")[1]


def test_stage_command_takes_the_file_and_options_override_it(dataset, tmp_path):
    path = _pipeline(tmp_path, dataset)
    pipe = load_pipeline(path)
    r = CliRunner().invoke(main, ["audio-stats", "--config", path, "--workers", "0"])
    assert r.exit_code == 0, r.output
    fp = expected_fingerprint("audio-stats", pipe.stages)
    meta = json.load(open(tmp_path / "cache" / "audio-stats" / fp / "stage.json"))
    assert meta["params"] == {"silence_db": -45.0}

    r = CliRunner().invoke(main, ["audio-stats", "--config", path, "--silence-db", "-30", "--workers", "0"])
    assert r.exit_code == 0, r.output
    outputs = sorted(os.listdir(tmp_path / "cache" / "audio-stats"))
    params = [json.load(open(tmp_path / "cache" / "audio-stats" / o / "stage.json"))["params"] for o in outputs]
    assert sorted(p["silence_db"] for p in params) == [-45.0, -30.0]


def test_example_pipeline_file_loads():
    here = os.path.dirname(os.path.abspath(__file__))
    pipe = load_pipeline(os.path.join(here, "..", "examples", "pipeline.yaml"))
    assert pipe.declared and all(name in pipe.stages for name in pipe.order())
    assert pipe.manifest.endswith(os.path.join("demo", "data", "manifest.csv"))
    assert {"audio-stats", "hubert", "kmeans", "units"} <= set(pipe.declared)
    assert all(r.get("gpus") == 0 for r in pipe.resources.values())


def test_a_copied_project_runs_where_it_is_now(tmp_path):
    """``cp -a project copy``: the copy's pipeline names its own model file, of the same content
    (so the same fingerprint); that path is not what the output was planned with, and must not
    block the run. A touched audio file is recomputed, nothing else."""
    import shutil

    from soundstage.models.tiny import build_vggish

    project = tmp_path / "project"
    manifest = make_synthetic_dataset(str(project / "data"), clips=3, seed=2, workers=1)
    os.makedirs(project / "models")
    build_vggish(str(project / "models" / "vggish.pth"))
    (project / "pipeline.yaml").write_text(
        f"manifest: {os.path.relpath(manifest, project)}\ncache: cache\nstages:\n  vggish: {{checkpoint: models/vggish.pth}}\n"
    )
    first = CliRunner().invoke(main, ["run", str(project / "pipeline.yaml"), "--workers", "0"])
    assert first.exit_code == 0, first.output
    shutil.copytree(project, tmp_path / "copy", symlinks=True, copy_function=shutil.copy2)  # cp -a
    audio = next((tmp_path / "copy" / "data").rglob("*.wav"))
    os.utime(audio, (audio.stat().st_atime, audio.stat().st_mtime + 10))
    again = CliRunner().invoke(main, ["run", str(tmp_path / "copy" / "pipeline.yaml"), "--workers", "0"])
    assert again.exit_code == 0, again.output
    assert "done 1, already cached 2, stale 1, failed 0" in again.output, again.output
