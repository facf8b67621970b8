"""A user's mistake ends in one clear line naming the file / row / option (exit 1, or click's 2 for
an option out of range), never a traceback; an unexpected error (a bug) is one line too, with its
traceback behind --debug or SOUNDSTAGE_DEBUG=1."""

from __future__ import annotations

import os

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from _wavs import make_wavs, write_manifest
from click.testing import CliRunner

from soundstage.cli import TOOL_COMMANDS, main


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line_error(result, *words, code=1):
    """Exit ``code``, no traceback, exactly one ``Error:`` line, holding every one of ``words``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert str(word) in errors[0], result.output
    return errors[0]


@pytest.fixture(scope="module")
def units_cache(tmp_path_factory):
    """Two clips through tiny HuBERT -> k-means (k=2) -> units twice (top_k 1 and 2)."""
    from transformers import HubertModel

    from soundstage.models.tiny import tiny_hubert_config

    root = tmp_path_factory.mktemp("units")
    manifest = write_manifest(str(root), make_wavs(str(root), n=2, seconds=(2,)))
    torch.manual_seed(0)
    HubertModel(tiny_hubert_config()).save_pretrained(root / "hubert")
    cache = str(root / "cache")
    common = ["--manifest", manifest, "--cache", cache, "--no-progress", "--workers", 0]
    for args in (
        ["hubert", "--model", root / "hubert", "--layer", 2, "--device", "cpu"],
        ["kmeans", "--k", 2, "--percent", 1, "--device", "cpu"],
        ["units", "--top-k", 1],
        ["units", "--top-k", 2],
    ):
        result = invoke(*args, *common)
        assert result.exit_code == 0, result.output
    return str(root), manifest, cache


def test_export_km_with_several_units_outputs_or_a_missing_folder(units_cache, tmp_path):
    _, _, cache = units_cache
    line = assert_one_line_error(invoke("export", "km", "--cache", cache, "--out", tmp_path / "a.km"), "2 units outputs")
    assert "--units" in line
    assert_one_line_error(
        invoke("export", "km", "--cache", cache, "--units", "top_k=2", "--out", tmp_path / "no" / "a.km"),
        "--out",
        "does not exist",
    )
    assert not os.path.exists(tmp_path / "no")


def test_refused_pickle_under_trust_pickle_is_one_line(units_cache, tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    root, manifest, cache = units_cache
    km = MiniBatchKMeans(n_clusters=2, n_init=1, random_state=0).fit(np.random.default_rng(0).random((20, 32)))
    km.extra = os.system  # a global no k-means needs: refused even when trusted
    joblib.dump(km, tmp_path / "evil.bin")
    result = invoke(
        "kmeans",
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--import-centroids",
        tmp_path / "evil.bin",
        "--trust-pickle",
        "--percent",
        1,
    )
    assert_one_line_error(result, "evil.bin", "refusing to load global")


def test_bad_num_frames_is_a_named_manifest_value(units_cache):
    root, manifest, cache = units_cache
    rows = pd.read_csv(manifest, dtype=str)
    rows["num_frames"] = ["-2", "abc"]
    bad = write_manifest(root, rows.to_dict("records"), name="bad_frames.csv")
    result = invoke("units", "--manifest", bad, "--cache", cache, "--top-k", 1, "--force", "--no-progress", "--workers", 0)
    assert result.exit_code == 1 and "Traceback" not in result.output
    for cid, value in zip(rows["clip_id"], ["-2", "abc"]):
        assert f"failed {cid}: bad manifest value num_frames='{value}'" in result.output, result.output


def test_num_frames_values():
    from soundstage.manifests.table import frame_count
    from soundstage.pipeline.stage import ClipError

    assert frame_count({"num_frames": "5"}) == 5 and frame_count({"num_frames": "5.0"}) == 5
    assert frame_count({"num_frames": ""}) is None and frame_count({}) is None and frame_count({"num_frames": "0"}) == 0
    for bad in ("-2", "abc", "2.5", "nan", "inf"):
        with pytest.raises(ClipError, match="bad manifest value num_frames"):
            frame_count({"num_frames": bad})


@pytest.fixture
def wav_manifest(tmp_path):
    return write_manifest(str(tmp_path), make_wavs(str(tmp_path), n=2, seconds=(1,)))


def test_non_utf8_manifest_names_file_and_row(wav_manifest, tmp_path):
    raw = open(wav_manifest, "rb").read().splitlines(keepends=True)
    raw[2] = raw[2].replace(b"audio", b"\xe9audio", 1)  # latin-1 in the second clip's row
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"".join(raw))
    assert_one_line_error(invoke("audio-stats", "--manifest", path, "--cache", tmp_path / "c"), str(path), "row 3 is not UTF-8")


def test_manifest_without_a_needed_column_is_one_error(wav_manifest, tmp_path):
    rows = pd.read_csv(wav_manifest).drop(columns=["audio_path"])
    path = write_manifest(str(tmp_path), rows.to_dict("records"), name="no_audio.csv")
    result = invoke("audio-stats", "--manifest", path, "--cache", tmp_path / "c", "--workers", 0)
    assert_one_line_error(result, path, "audio_path", "audio-stats")
    assert "failed clip" not in result.output
    assert not os.path.exists(tmp_path / "c" / "audio-stats")  # refused before any output exists


@pytest.mark.parametrize("option", ["--jobs", "--batch-size", "--commit-every"])
def test_zero_counts_are_refused(wav_manifest, tmp_path, option):
    result = invoke("audio-stats", "--manifest", wav_manifest, "--cache", tmp_path / "c", option, 0)
    assert_one_line_error(result, option, "0 is not in the range", code=2)
    assert not os.path.exists(tmp_path / "c")


def test_run_refuses_zero_jobs(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("manifest: m.csv\nstages:\n  audio-stats: {}\n")
    assert_one_line_error(invoke("run", path, "--jobs", 0), "--jobs", code=2)


def test_pipeline_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("manifest: m.csv\nstages:\n  hubert: {layer: 2\n")
    assert_one_line_error(invoke("run", path), str(path), "line 4", "not valid YAML")
    assert_one_line_error(invoke("hubert", "--config", path), str(path), "not valid YAML")


@pytest.mark.parametrize("value", ["two", "2.5", "true"])
def test_parameter_of_the_wrong_type_is_named(tmp_path, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"manifest: m.csv\nstages:\n  hubert:\n    layer: {value}\n")
    assert_one_line_error(invoke("run", path), str(path), "hubert", "parameter layer", "is not a whole number")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("mine")
    assert_one_line_error(invoke("demo", "--out", tmp_path), "--out", "holds no synthetic dataset")
    assert (tmp_path / "data" / "thesis.tex").read_text() == "mine"


def test_a_bug_is_one_line_and_its_traceback_is_behind_debug(monkeypatch):
    import click

    @click.command("boom")
    def boom():
        return 1 / 0

    monkeypatch.setitem(TOOL_COMMANDS, "boom", "test_user_errors:BOOM")
    monkeypatch.setattr("test_user_errors.BOOM", boom, raising=False)
    monkeypatch.delenv("SOUNDSTAGE_DEBUG", raising=False)
    assert_one_line_error(invoke("boom"), "ZeroDivisionError", "--debug", "SOUNDSTAGE_DEBUG=1")
    try:
        for result in (invoke("boom", env={"SOUNDSTAGE_DEBUG": "1"}), invoke("--debug", "boom")):
            assert isinstance(result.exception, ZeroDivisionError)  # raised: Python prints the traceback
    finally:
        os.environ.pop("SOUNDSTAGE_DEBUG", None)  # --debug sets it for this process and its children


@pytest.mark.parametrize("stage", ["beats", "vggish"])
def test_a_text_file_as_checkpoint_is_named(wav_manifest, tmp_path, stage):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    result = invoke(
        stage, "--manifest", wav_manifest, "--cache", tmp_path / "c", "--checkpoint", text, "--workers", 0, "--no-progress"
    )
    assert_one_line_error(result, str(text), "not a torch checkpoint file", "expected")


def test_a_cuda_device_on_a_cpu_only_torch_is_one_line(wav_manifest, tmp_path, monkeypatch):
    from soundstage.models.tiny import build_vggish

    monkeypatch.setattr(torch.version, "cuda", None)  # what a CPU-only build of torch says
    checkpoint = build_vggish(str(tmp_path / "vggish.pth"))
    common = ["--manifest", wav_manifest, "--cache", tmp_path / "c", "--checkpoint", checkpoint, "--workers", 0, "--no-progress"]
    assert_one_line_error(invoke("vggish", *common, "--device", "cuda:0"), "--device cuda:0", "CPU-only build", "--device cpu")
    assert_one_line_error(invoke("vggish", *common, "--device", "gpu"), "--device gpu", "not a device name")


def test_a_missing_model_folder_or_an_uncached_hub_id_offline(wav_manifest, tmp_path, monkeypatch):
    from huggingface_hub import constants

    common = ["--manifest", wav_manifest, "--cache", tmp_path / "c", "--workers", 0, "--no-progress", "--device", "cpu"]
    missing = tmp_path / "nonexistent" / "hubert"
    assert_one_line_error(invoke("hubert", *common, "--model", missing), f"--model {missing}: no such folder")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = assert_one_line_error(invoke("hubert", *common, "--model", "facebook/hubert-base-ls960"), "facebook/hubert-base-ls960")
    assert "not in the local Hugging Face cache" in line and "hf download facebook/hubert-base-ls960" in line
