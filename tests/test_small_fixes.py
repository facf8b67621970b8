"""The smaller things a user hit: the demo's manifest hint, model-loading bars under --no-progress,
kmeans options, imported centroids in status, --gpus TYPE:COUNT, progress on large inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _wavs import make_wavs, write_manifest
from click.testing import CliRunner

from soundstage.cli import main


def test_the_demo_hint_for_a_real_manifest_is_a_working_command():
    from soundstage.demo import how_to_go_real
    from soundstage.manifests.cli import avsbench

    hint = next(line for line in how_to_go_real("p.yaml", ["hubert"]).splitlines() if "manifest avsbench" in line)
    assert "soundstage manifest avsbench /path/to/AVSBench -o OUT.csv" in hint
    assert "-o" in [opt for param in avsbench.params for opt in param.opts]


def test_no_model_loading_bars_under_no_progress(tmp_path):
    from transformers import HubertModel

    from soundstage.models.tiny import tiny_hubert_config

    manifest = write_manifest(str(tmp_path), make_wavs(str(tmp_path), n=1, seconds=(1,)))
    torch.manual_seed(0)
    HubertModel(tiny_hubert_config()).save_pretrained(tmp_path / "hubert")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "soundstage.cli",
            "hubert",
            "--manifest",
            manifest,
            "--cache",
            str(tmp_path / "c"),
            "--model",
            str(tmp_path / "hubert"),
            "--layer",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "%|" not in result.stderr, result.stderr


def test_kmeans_shows_and_takes_no_per_clip_options():
    result = CliRunner().invoke(main, ["kmeans", "--help"])
    for option in ("--shard ", "--jobs", "--workers", "--batch-size", "--commit-every", "--max-consecutive-errors", "--shards"):
        assert option not in result.output
    assert "--percent" in result.output
    refused = CliRunner().invoke(main, ["kmeans", "--manifest", "m.csv", "--shard", "0/2"])
    assert refused.exit_code == 2 and "--shard does not apply" in refused.output
    assert "--shard " in CliRunner().invoke(main, ["hubert", "--help"]).output  # per-clip stages keep them


def test_imported_centroids_are_not_described_by_k(tmp_path):
    from soundstage.pipeline.fingerprint import fingerprint_payload, shown_params
    from soundstage.stages import get_stage

    kmeans = get_stage("kmeans")
    np.save(tmp_path / "c.npy", np.zeros((7, 4), np.float32))
    centroids = str(tmp_path / "c.npy")
    assert "k" not in shown_params(kmeans, {"import_centroids": centroids})
    assert shown_params(kmeans, {"k": 7})["k"] == 7
    imported = [fingerprint_payload(kmeans, {"import_centroids": centroids, "k": k}, {}) for k in (5, 100)]
    assert imported[0] == imported[1] and "k" not in imported[0]["params"]


@pytest.mark.parametrize("gpus", ["2", "a100:2"])
def test_gpus_option_takes_a_count_or_type_and_count(tmp_path, gpus):
    manifest = write_manifest(str(tmp_path), make_wavs(str(tmp_path), n=1, seconds=(1,)))
    result = CliRunner().invoke(
        main,
        [
            "audio-stats",
            "--manifest",
            manifest,
            "--cache",
            str(tmp_path / "c"),
            "--executor",
            "slurm",
            "--dry-run",
            "--gpus",
            gpus,
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"#SBATCH --gres=gpu:{gpus}" in result.output


def test_gpus_option_refuses_other_text(tmp_path):
    result = CliRunner().invoke(main, ["audio-stats", "--manifest", "m.csv", "--gpus", "two"])
    assert result.exit_code == 2 and "--gpus" in result.output and "TYPE:COUNT" in result.output


def test_manifest_building_shows_progress(tmp_path):
    from soundstage.manifests.synth import make_synthetic_dataset

    root = make_synthetic_dataset(str(tmp_path / "d"), clips=2, seed=0, workers=1)
    result = CliRunner().invoke(main, ["manifest", "avsbench", os.path.dirname(root), "-o", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    assert "checking clips" in result.output
    quiet = CliRunner().invoke(
        main, ["manifest", "avsbench", os.path.dirname(root), "-o", str(tmp_path / "m.csv"), "--no-progress"]
    )
    assert "checking clips" not in quiet.output


def test_kmeans_shows_progress_while_reading_features(capsys):
    from soundstage.stages.kmeans import read_sample

    class Reader:  # the two calls read_sample makes of a cache reader
        def lengths(self, field, ids):
            return np.array([3] * len(ids))

        def __getitem__(self, cid):
            return {"features": np.full((3, 2), float(cid))}

    sample = read_sample(Reader(), ["1", "2"], progress=True)
    assert sample.tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 3
    assert "kmeans: reading features" in capsys.readouterr().err
