"""``soundstage demo`` end to end (a few clips), and the tiny stand-in models it builds.

The demo must leave every stage's output complete in the cache, compute nothing on a rerun, fail
(nonzero exit) when a clip fails, and never overwrite a pipeline file the user edited. The tiny
models must load through the real loaders: their outputs are checked against the libraries' own
forward passes, and the BEATs labels against the AudioSet class list read independently.
"""

import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundstage.audio import load_audio
from soundstage.cache import open_stage
from soundstage.cache.reader import read_result
from soundstage.cli import main
from soundstage.manifests.table import read_manifest
from soundstage.models import tiny
from soundstage.stages import BUILTIN_STAGES

CLIPS = 3
WARNING = "TINY RANDOM STAND-IN MODELS"

torch.set_num_threads(1)  # the demo runs in this process; the machine is shared


def run_demo(out_dir, *extra):
    return CliRunner().invoke(main, ["demo", "--out", str(out_dir), "--clips", str(CLIPS), *extra])


def stage_outputs(out_dir) -> dict:
    """stage name -> its output directories in the demo's cache."""
    cache = os.path.join(out_dir, "cache")
    return {
        name: sorted(os.path.join(cache, name, fp) for fp in os.listdir(os.path.join(cache, name))) for name in os.listdir(cache)
    }


def part_files(out_dir) -> list:
    return sorted(
        (os.path.join(root, f), os.path.getmtime(os.path.join(root, f)))
        for root, _, files in os.walk(os.path.join(out_dir, "cache"))
        for f in files
        if f.endswith(".h5")
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "demo"
    result = run_demo(out_dir)
    return out_dir, result


def test_demo_computes_every_stage_for_every_clip(first_run):
    out_dir, result = first_run
    assert result.exit_code == 0, result.output
    assert result.output.count(WARNING) == 2  # said at the start and again beside the results
    assert result.output.splitlines()[1].strip().startswith("soundstage demo")
    clip_ids = set(read_manifest(os.path.join(out_dir, "data", "manifest.csv"))["clip_id"])
    assert len(clip_ids) == CLIPS

    outputs = stage_outputs(out_dir)
    # every shipped stage ran, each exactly once; masks reads a trained run, and the demo trains
    # only with train and val clips (not with 3 clips)
    assert set(outputs) == set(BUILTIN_STAGES) - {"masks"}
    for name, dirs in outputs.items():
        assert len(dirs) == 1, (name, dirs)
        if name == "kmeans":
            assert read_result(dirs[0])["centroids"].shape == (16, 64)  # k of the demo, width of tiny HuBERT
        else:
            assert set(open_stage(dirs[0])) == clip_ids, name
        fingerprint = os.path.basename(dirs[0])
        assert any(line.startswith(name) and fingerprint in line for line in result.output.splitlines()), name
    assert os.path.join(out_dir, "cache") in result.output


def test_demo_pipeline_file_names_the_tiny_models_and_the_real_ones(first_run):
    out_dir, _ = first_run
    text = (out_dir / "pipeline.yaml").read_text()
    for _name, (_build, file_name, real) in tiny.TINY_MODELS.items():
        line = next(line for line in text.splitlines() if f"models/{file_name}" in line)
        assert f"# real: {real}" in line, line


def test_demo_hubert_features_equal_the_transformers_forward(first_run):
    """The cached features of the tiny HuBERT are its transformers forward (layer 2 = the last)."""
    from transformers import HubertModel

    out_dir, _ = first_run
    data = out_dir / "data"
    row = read_manifest(str(data / "manifest.csv")).iloc[0]
    model = HubertModel.from_pretrained(str(out_dir / "models" / "hubert")).eval()
    wave = load_audio(str(data / row["audio_path"])).wave  # not normalised: the tiny model says do_normalize false
    with torch.no_grad():
        expected = model(torch.from_numpy(wave)[None], output_hidden_states=True).hidden_states[2][0].numpy()
    record = open_stage(stage_outputs(out_dir)["hubert"][0])[row["clip_id"]]
    cached = np.asarray(record["features"], dtype=np.float32)
    assert cached.shape == expected.shape
    np.testing.assert_allclose(cached, expected, rtol=2e-3, atol=2e-3)


def test_rerun_computes_nothing_and_an_edited_pipeline_file_is_left_alone(first_run, tmp_path):
    out_dir, _ = first_run
    parts = part_files(out_dir)
    again = run_demo(out_dir)
    assert again.exit_code == 0, again.output
    assert "nothing new computed" in again.output
    assert "dataset: 3 synthetic clips already in" in again.output and "models: tiny stand-ins already in" in again.output
    assert part_files(out_dir) == parts

    # the folder moved elsewhere: same fingerprints (content hashes, no paths), nothing to compute
    moved = tmp_path / "moved"
    shutil.copytree(out_dir, moved)
    elsewhere = run_demo(moved)
    assert elsewhere.exit_code == 0 and "nothing new computed" in elsewhere.output, elsewhere.output
    fingerprints = [sorted(os.path.basename(d) for d in sum(stage_outputs(folder).values(), [])) for folder in (moved, out_dir)]
    assert fingerprints[0] == fingerprints[1]

    pipeline = out_dir / "pipeline.yaml"
    edited = pipeline.read_text().replace("k: 16", "k: 8")
    pipeline.write_text(edited)
    refused = run_demo(out_dir)
    assert refused.exit_code != 0 and "was edited" in refused.output
    assert pipeline.read_text() == edited and part_files(out_dir) == parts


def test_a_failed_clip_makes_the_demo_fail(first_run, tmp_path):
    out_dir, _ = first_run
    broken = tmp_path / "demo"
    shutil.copytree(out_dir / "data", broken / "data")  # same clips and seed: the demo keeps them
    shutil.copytree(out_dir / "models", broken / "models")
    row = read_manifest(str(broken / "data" / "manifest.csv")).iloc[1]
    (broken / "data" / row["audio_path"]).write_bytes(b"not a wav file")
    result = run_demo(broken)
    assert result.exit_code == 1, result.output
    assert f"failed {row['clip_id']}" in result.output
    table = [line.split() for line in result.output.splitlines() if re.match(r"audio-stats +[0-9a-f]+ +\d+/", line)]
    assert table and table[-1][2:5] == ["2/3", "1", "2"]  # clips done, failed, new this run
    assert "NOT FINISHED" in result.output


# ----------------------------------------------------------------------------- the tiny models


def test_tiny_beats_is_an_official_format_checkpoint_labelled_with_audioset_mids(tmp_path):
    from soundstage.models.beats import BEATs

    path = tiny.build_beats(tmp_path / "beats.pt", seed=3)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"cfg", "model", "label_dict"}
    model = BEATs.from_checkpoint(path)
    spec = tiny.tiny_config("beats")
    with open(os.path.join(os.path.dirname(tiny.TINY_CONFIG_DIR), "audioset", "class_labels_indices.csv"), newline="") as f:
        mid_of = {row["display_name"]: row["mid"] for row in csv.DictReader(f)}
    assert model.class_mids == [mid_of[name] for name in spec["classes"]]
    assert model.predictor.out_features == len(spec["classes"])
    assert all(state["cfg"][k] for k in ("deep_norm", "relative_position_embedding", "gru_rel_pos", "finetuned_model"))
    with torch.no_grad():
        probs = model.extract_features(torch.randn(2, 16000))[0]
    assert probs.shape == (2, len(spec["classes"])) and bool(((probs > 0) & (probs < 1)).all())

    # seeded: the same seed gives the same weights, another seed other weights
    same = torch.load(tiny.build_beats(tmp_path / "again.pt", seed=3), weights_only=True)["model"]
    other = torch.load(tiny.build_beats(tmp_path / "other.pt", seed=4), weights_only=True)["model"]
    key = "encoder.layers.0.fc1.weight"
    assert torch.equal(same[key], state["model"][key]) and not torch.equal(other[key], state["model"][key])


def test_tiny_models_are_reproducible_files(tmp_path):
    """Same seed -> same bytes, so a rebuilt model keeps its content hash (and the cache its outputs)."""

    def digest(path):
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
        return {os.path.relpath(f, path): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}

    first = tiny.build_tiny_models(tmp_path / "a", seed=0, names=["hubert", "imagebind_text"])
    second = tiny.build_tiny_models(tmp_path / "b", seed=0, names=["hubert", "imagebind_text"])
    for name in first:
        assert digest(first[name]) == digest(second[name]), name
    with open(os.path.join(first["hubert"], "preprocessor_config.json")) as f:
        assert json.load(f)["do_normalize"] is False  # as facebook/hubert-base-ls960
