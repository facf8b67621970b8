"""The cache key says what is stored: each case below once let two different outputs share a key,
or let an array task write somewhere the planner never looks."""

from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

from soundstage.cache.store import iter_stage_dirs
from soundstage.pipeline import identity
from soundstage.pipeline.fingerprint import fingerprint, fingerprint_payload, normalise_params
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.registry import STAGE_MODULES, register_stage
from soundstage.pipeline.runner import plan_stage
from soundstage.pipeline.stage import Field, Param, Stage
from soundstage.pipeline.task_args import stage_cli_args

sys.path.insert(0, os.path.dirname(__file__))


def _length(model, items, params):
    return [{"n": len(cid)} for cid in items]


#: a stage with a model file in its key (its content hash), and a boolean parameter
TOY_MODEL = Stage(
    name="toy-model",
    version=1,
    params=[Param("model", str, None, identity=model_identity), Param("flag", bool, True)],
    fields=[Field("n", "int32", ())],
    load=lambda row, ctx: row["clip_id"],
    process=_length,
)


@pytest.fixture
def toy(tmp_path):
    register_stage("toy-model", "test_cache_keys:TOY_MODEL")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("clip_id\n" + "".join(f"clip{i:02d}\n" for i in range(6)))
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights as planned")
    yield str(manifest), str(tmp_path / "cache"), str(model)
    STAGE_MODULES.pop("toy-model", None)


def _cli(args):
    from soundstage.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_array_task_writes_to_the_planned_fingerprint_without_rehashing(toy, monkeypatch):
    from soundstage.stages import get_stage

    manifest, cache, model = toy
    stage = get_stage("toy-model")
    plan = plan_stage(stage, manifest, cache, {"model": model}, log=lambda *_: None)
    plan.dir.initialise(plan.meta)
    args = stage_cli_args(stage, {"model": model}, manifest, cache, {}, {"workers": 0}, fingerprint=plan.fingerprint)
    # on the compute node the model identity would come out differently (another hub revision,
    # a re-synced file); the task must neither hash it again nor write elsewhere
    with open(model, "wb") as f:
        f.write(b"weights changed on the node")
    monkeypatch.setattr(identity, "file_sha256", lambda path: pytest.fail(f"task re-hashed {path}"))
    for shard in ("0/2", "1/2"):
        result = _cli(["toy-model", *args, "--shard", shard])
        assert result.exit_code == 0, result.output
    assert [sd.path for sd in iter_stage_dirs(cache, "toy-model")] == [plan.dir.path]
    assert len(plan.dir.committed_ids()) == 6

    # a task whose options differ from the plan is refused with one line, not run elsewhere
    other = stage_cli_args(
        stage, {"model": model, "flag": False}, manifest, cache, {}, {"workers": 0}, fingerprint=plan.fingerprint
    )
    result = _cli(["toy-model", *other, "--shard", "0/2"])
    assert result.exit_code == 1
    assert "planned with other parameters: flag=True there, False here" in result.output


def test_slurm_scripts_carry_the_planned_fingerprint(toy):
    from soundstage.stages import get_stage

    manifest, cache, model = toy
    result = _cli(
        [
            "toy-model",
            "--manifest",
            manifest,
            "--cache",
            cache,
            "--model",
            model,
            "--executor",
            "slurm",
            "--shards",
            "2",
            "--dry-run",
        ]
    )
    assert result.exit_code == 0, result.output
    planned = plan_stage(get_stage("toy-model"), manifest, cache, {"model": model}, log=lambda *_: None)
    handed = {line.split("--fingerprint ")[1].split()[0] for line in result.output.splitlines() if "--fingerprint " in line}
    assert handed == {planned.fingerprint}


def test_model_files_are_hashed_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDSTAGE_DIGEST_CACHE", str(tmp_path / "digests"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"w" * 1000)
    first = model_identity(str(model_dir))
    # another process on this machine (nothing in memory) reads the digests, not the files
    monkeypatch.setattr(identity, "_FILE_HASHES", {})
    monkeypatch.setattr(identity, "file_sha256", lambda path: pytest.fail(f"re-hashed {path}"))
    assert model_identity(str(model_dir)) == first
    # a changed file (size or mtime) is hashed again
    (model_dir / "model.safetensors").write_bytes(b"v" * 1001)
    with pytest.raises(pytest.fail.Exception, match="re-hashed .*model.safetensors"):
        model_identity(str(model_dir))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))


def test_sources_on_error_is_in_the_key(offline_hub):
    from soundstage.stages.sources import STAGE

    ups = {"caption": "0123456789abcdef"}
    fail, store = (fingerprint(STAGE, {"on_error": mode}, ups) for mode in ("fail", "store"))
    assert fail != store  # `store` keeps error rows that a `fail` run must not count as done
    # outputs made before the parameter was keyed (all `fail`) keep their fingerprint
    assert "on_error" not in fingerprint_payload(STAGE, {"on_error": "fail"}, ups)["params"]


def test_sources_llm_backend_is_in_the_key(offline_hub):
    from soundstage.stages.sources import STAGE

    ups = {"caption": "0123456789abcdef"}
    local = fingerprint(STAGE, {"llm": "served-model"}, ups)
    endpoint = fingerprint(STAGE, {"llm": "served-model", "llm_endpoint": "http://gpu7:8000/v1"}, ups)
    moved = fingerprint(STAGE, {"llm": "served-model", "llm_endpoint": "http://gpu9:8001/v1"}, ups)
    assert local != endpoint  # another inference engine, other answers
    assert endpoint == moved  # the server's address is not what is stored


def test_boolean_selector_false_means_false():
    assert normalise_params(TOY_MODEL, {"flag": "false"})["flag"] is False
    assert normalise_params(TOY_MODEL, {"flag": "True"})["flag"] is True
    assert normalise_params(TOY_MODEL, {"flag": False})["flag"] is False
    with pytest.raises(ValueError, match="parameter flag: 'maybe' is not a boolean"):
        normalise_params(TOY_MODEL, {"flag": "maybe"})
