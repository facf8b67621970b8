"""``soundstage evaluate`` on the synthetic dataset: ground truth as prediction, emptied masks,
class-index predictions, missing files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures_synth import synth_dir  # noqa: F401  (pytest fixture)
from PIL import Image

from soundstage.cli import main

BINARY = ("avsbench-binary", "bias-in-avs", "stepping-stones", "segpref")


def annotated_test_frames(root):
    """``[(subset, clip_id, frame, class-index label)]`` of the annotated test frames, read directly."""
    import csv

    out = []
    with open(os.path.join(root, "metadata.csv")) as f:
        for row in csv.DictReader(f):
            if row["split"] != "test":
                continue
            label_dir = os.path.join(root, row["label"], row["uid"], "labels_semantic")
            for name in sorted(os.listdir(label_dir)):
                out.append((row["label"], row["uid"], name[:-4], np.asarray(Image.open(os.path.join(label_dir, name)))))
    return out


def write_predictions(root, out, transform):
    for subset, uid, frame, label in annotated_test_frames(root):
        os.makedirs(os.path.join(out, subset, uid), exist_ok=True)
        Image.fromarray(transform(label).astype(np.uint8)).save(os.path.join(out, subset, uid, f"{frame}.png"))


def run(*args):
    return CliRunner().invoke(main, ["evaluate", *args])


def scores(synth_dir, pred, *extra):  # noqa: F811
    result = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_ground_truth_as_prediction_scores_one(synth_dir, tmp_path):  # noqa: F811
    pred = str(tmp_path / "gt")
    write_predictions(synth_dir, pred, lambda label: (label > 0) * 255)
    results = scores(synth_dir, pred)
    for name in BINARY:
        assert results[name]["miou"] == pytest.approx(1.0, abs=1e-6)
        assert results[name]["fscore"] is None and "binary masks" in results[name]["notes"][0]
        assert results[name]["frames"] == len(annotated_test_frames(synth_dir))
    assert results["cavp-dataset"]["miou"] == pytest.approx(1.0, abs=1e-6)
    assert "needs class predictions" in results["avsbench-semantic"]["unavailable"]


def test_emptied_masks(synth_dir, tmp_path):  # noqa: F811
    pred = str(tmp_path / "empty")
    write_predictions(synth_dir, pred, lambda label: label * 0)
    results = scores(synth_dir, pred, "--eval-size", "native")
    # an empty frame scores 1 (true negatives), any other 0; the protocols average them their own way
    empty = {}  # clip -> [frame is empty], clips in the dataset's order
    for _, uid, _, label in annotated_test_frames(synth_dir):
        empty.setdefault(uid, []).append(not label.any())
    assert 0 < sum(map(sum, empty.values())) < sum(map(len, empty.values()))  # silent seconds exist, not only
    videos = list(empty.values())
    expected = {
        "the whole set as one batch": np.mean(sum(videos, [])),
        "per video, mean over videos": np.mean([np.mean(frames) for frames in videos]),
        "per batch of 4 videos, mean over batches": np.mean(
            [np.mean(sum(videos[i : i + 4], [])) for i in range(0, len(videos), 4)]
        ),
    }
    for name in BINARY:
        assert results[name]["miou"] == pytest.approx(expected[results[name]["aggregation"]], abs=1e-6), name
    assert results["refavs-null"]["null_score"] == 0.0


def test_class_predictions_and_probability_maps(synth_dir, tmp_path):  # noqa: F811
    classes = str(tmp_path / "classes")
    write_predictions(synth_dir, classes, lambda label: label)
    results = scores(synth_dir, classes, "--png", "labels")
    assert results["avsbench-semantic"]["miou_present"] == pytest.approx(1.0, abs=1e-6)
    assert results["avsbench-binary"]["miou"] == pytest.approx(1.0, abs=1e-6)  # foreground = any class
    probability = str(tmp_path / "prob")
    write_predictions(synth_dir, probability, lambda label: np.where(label > 0, 230, 20))
    results = scores(synth_dir, probability, "--protocol", "avsbench-binary", "--eval-size", "native")
    assert results["avsbench-binary"]["miou"] == pytest.approx(1.0, abs=1e-6)
    assert results["avsbench-binary"]["fscore"] == pytest.approx(1.0, abs=1e-6)


def test_table_and_missing_predictions(synth_dir, tmp_path):  # noqa: F811
    pred = str(tmp_path / "gt")
    write_predictions(synth_dir, pred, lambda label: (label > 0) * 255)
    table = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"))
    assert table.exit_code == 0 and all(name in table.output for name in BINARY)
    subset, uid, frame, _ = annotated_test_frames(synth_dir)[0]
    os.remove(os.path.join(pred, subset, uid, f"{frame}.png"))
    missing = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"))
    assert missing.exit_code == 1
    assert "1 predictions missing" in missing.output and f"{subset}/{uid}/{frame}" in missing.output


def test_a_prediction_of_another_size_or_junk_bytes_is_named(synth_dir, tmp_path):  # noqa: F811
    pred = str(tmp_path / "gt")
    write_predictions(synth_dir, pred, lambda label: (label > 0) * 255)
    frames = annotated_test_frames(synth_dir)
    subset, uid, frame, label = next(f for f in frames if sum(g[1] == f[1] for g in frames) > 1)  # a clip of several frames
    path = os.path.join(pred, subset, uid, f"{frame}.png")
    height, width = label.shape
    Image.fromarray(np.zeros((height // 2, width // 2), np.uint8)).save(path)
    result = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"))
    assert result.exit_code == 1 and "Traceback" not in result.output and "bug" not in result.output, result.output
    assert f"{path}: {width // 2}x{height // 2} pixels, but the clip's other predictions are {width}x{height}" in result.output
    with open(path, "wb") as f:
        f.write(b"<html>not a png</html>")
    result = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"))
    assert result.exit_code == 1 and "bug" not in result.output, result.output
    assert f"{path}: not an image" in result.output


def test_a_clip_id_in_two_rows_is_refused_not_scored_twice(synth_dir, tmp_path):  # noqa: F811
    import pandas as pd

    pred = str(tmp_path / "gt")
    write_predictions(synth_dir, pred, lambda label: (label > 0) * 255)
    rows = pd.read_csv(os.path.join(synth_dir, "manifest.csv"), dtype=str, keep_default_na=False)
    manifest = os.path.join(synth_dir, f"{tmp_path.name}.csv")  # beside it: the same relative paths
    pd.concat([rows, rows.iloc[[0]]]).to_csv(manifest, index=False)
    try:
        result = run("--pred", pred, "--manifest", manifest)
    finally:  # the dataset is shared by the session's tests (test_synth compares its files)
        os.remove(manifest)
    assert result.exit_code == 1 and "bug" not in result.output, result.output
    assert f"clip_id {rows['clip_id'].iloc[0]} is in rows 2, {len(rows) + 2}" in result.output


def test_protocol_options_and_the_published_aggregation(synth_dir, tmp_path):  # noqa: F811
    from soundstage.manifests.table import read_manifest

    pred = str(tmp_path / "empty")
    write_predictions(synth_dir, pred, lambda label: label * 0)  # IoU 1 on frames without foreground, else 0
    empty = {(uid, int(frame)): float(not label.any()) for _, uid, frame, label in annotated_test_frames(synth_dir)}
    rows = read_manifest(os.path.join(synth_dir, "manifest.csv"))
    videos = [
        [empty[(cid, f)] for f in sorted(f for c, f in empty if c == cid)] for cid in rows[rows["split"] == "test"]["clip_id"]
    ]
    batches = [sum(videos[i : i + 4], []) for i in range(0, len(videos), 4)]
    native = ("--protocol", "avsbench-binary", "--eval-size", "native")
    for options, expected, words in (
        ((), np.mean(sum(videos, [])), "the whole set as one batch"),
        (("--aggregation", "paper"), np.mean([np.mean(b) for b in batches]), "per batch of 4 videos, mean over batches"),
        (("--batch-size", "4"), np.mean([np.mean(b) for b in batches]), "per batch of 4 videos, mean over batches"),
        (("--aggregation", "video"), np.mean([np.mean(v) for v in videos]), "per video, mean over videos"),
        (
            ("--option", "batch_size=2", "--threshold", "0.4"),
            np.mean([np.mean(sum(videos[i : i + 2], [])) for i in range(0, len(videos), 2)]),
            "per batch of 2 videos",
        ),  # fmt: skip
    ):
        result = scores(synth_dir, pred, *native, *options)["avsbench-binary"]
        assert result["miou"] == pytest.approx(expected, abs=1e-6) and result["aggregation"].startswith(words), options
    table = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"), "--aggregation", "paper")
    assert table.exit_code == 0, table.output
    assert "per batch of 4 videos" in table.output and "one confusion matrix over the set" in table.output
    wrong = run("--pred", pred, "--manifest", os.path.join(synth_dir, "manifest.csv"), *native, "--option", "beta=0.3")
    assert wrong.exit_code == 1 and "protocol option beta: not an option of avsbench-binary" in wrong.output
