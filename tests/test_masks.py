"""The masks stage (stage-1 "stepping-stone" masks), their export and their import."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures_synth import synth_dir  # noqa: F401
from fixtures_trained import absolute_manifest, trained_run  # noqa: F401
from PIL import Image

from soundstage.cache import open_stage
from soundstage.cli import main
from soundstage.manifests.table import frame_path, read_manifest
from soundstage.pipeline.runner import run_stage
from soundstage.stages import get_stage

QUIET = {"progress": False, "log": lambda *_: None}


def _run_masks(manifest, cache, batch_size=None, **params):
    return run_stage(get_stage("masks"), manifest, cache, {"device": "cpu", **params}, batch_size=batch_size, **QUIET)


def _arrays(stage_dir):
    reader = open_stage(stage_dir)
    return {cid: reader[cid]["probs"] for cid in reader}


def _independent_probability(trained, row, manifest_dir):
    """Foreground probability of one clip's frames, computed here from the model's raw outputs:
    p = s1 / (s0 + s1) with s_c = sum_q softmax(class)_qc * sigmoid(mask_q) at 224 x 224."""
    from soundstage.train.data import load_image

    frames = int(row["num_frames"])
    pixels = torch.from_numpy(np.stack([load_image(frame_path(row, i, manifest_dir), trained.image_size) for i in range(frames)]))
    spec, reader = trained.cues["audio"]
    audio = np.asarray(reader[row["clip_id"]][spec.field], np.float32)
    audio = np.concatenate([audio, np.repeat(audio[-1:], max(0, frames - len(audio)), 0)])[:frames]
    with torch.no_grad():
        out = trained.model(pixel_values=pixels, audio=torch.from_numpy(audio))
    classes = torch.softmax(out.class_queries_logits, -1)[..., :2]  # [T, Q, 2] without "no object"
    masks = torch.sigmoid(
        torch.nn.functional.interpolate(out.masks_queries_logits, size=(224, 224), mode="bilinear", align_corners=False)
    )
    s = (classes[..., None, None] * masks[:, :, None]).sum(1)  # [T, 2, H, W]
    return (s[:, 1] / (s[:, 0] + s[:, 1])).numpy()


@pytest.fixture(scope="module")
def predicted(trained_run, tmp_path_factory):
    """The masks of every clip, computed in one uninterrupted run."""
    cache = str(tmp_path_factory.mktemp("masks_cache"))
    summary = _run_masks(trained_run["manifest"], cache, run=trained_run["run"], size=224)
    assert summary.ok
    return {"cache": cache, "path": summary.path, "fingerprint": summary.fingerprint}


def test_masks_stage_resumes_and_equals_per_clip_inference(trained_run, predicted, tmp_path):
    from soundstage.train.inference import open_trained

    rows = read_manifest(trained_run["manifest"]).to_dict("records")
    first = absolute_manifest(trained_run["manifest"], str(tmp_path / "first.csv"), keep=[r["clip_id"] for r in rows[:5]])
    cache = str(tmp_path / "cache")
    # a partial run (5 clips), then the whole manifest: only the other clips are computed
    partial = _run_masks(first, cache, run=trained_run["run"], size=224)
    resumed = _run_masks(trained_run["manifest"], cache, run=trained_run["run"], size=224, batch_size=3)
    assert (partial.done, resumed.cached, resumed.done, resumed.failed) == (5, 5, len(rows) - 5, [])
    assert resumed.fingerprint == predicted["fingerprint"]
    stored, uninterrupted = _arrays(resumed.path), _arrays(predicted["path"])
    assert sorted(stored) == sorted(r["clip_id"] for r in rows)
    for cid in stored:
        np.testing.assert_array_equal(stored[cid], uninterrupted[cid])

    # batched (8 clips per call) equals one clip at a time, computed independently of the stage
    trained = open_trained(trained_run["run"], device="cpu", log=lambda *_: None)
    manifest_dir = os.path.dirname(trained_run["manifest"])
    for row in rows:
        probs = uninterrupted[row["clip_id"]]
        assert probs.shape == (int(row["num_frames"]), 224, 224) and probs.dtype == np.uint8
        expected = np.rint(_independent_probability(trained, row, manifest_dir) * 255)
        assert np.abs(probs.astype(np.float64) - expected).max() <= 1, row["clip_id"]
    assert len({float(uninterrupted[r["clip_id"]].mean()) for r in rows}) > 1  # not one constant map


def test_masks_fingerprint_is_the_runs_content_not_its_path(trained_run, tmp_path):
    import shutil

    from soundstage.pipeline.runner import plan_stage

    moved = str(tmp_path / "elsewhere")
    shutil.copytree(trained_run["run"], moved)
    stage = get_stage("masks")

    def plan(run, size=224, **weights):
        return plan_stage(
            stage, trained_run["manifest"], trained_run["cache"], {"run": run, "size": size, **weights}, log=lambda *_: None
        ).fingerprint

    assert plan(trained_run["run"]) == plan(moved)
    assert plan(trained_run["run"], 112) != plan(trained_run["run"])
    assert plan(trained_run["run"], weights="last") != plan(trained_run["run"], weights="best")
    weights = os.path.join(moved, "model", "last", "model.safetensors")
    with open(weights, "r+b") as f:  # other weights: another output
        f.seek(-4, os.SEEK_END)
        last = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 1 for b in last))
    assert plan(moved) != plan(trained_run["run"])


def test_masks_needs_exactly_one_source(trained_run, tmp_path):
    result = CliRunner().invoke(
        main, ["masks", "--manifest", trained_run["manifest"], "--cache", str(tmp_path / "c"), "--workers", "0", "--no-progress"]
    )
    assert result.exit_code == 1 and "exactly one of --run" in result.output
    assert not os.path.exists(tmp_path / "c" / "masks") or not os.listdir(tmp_path / "c" / "masks")


def _export(manifest, cache, out, *extra):
    return CliRunner().invoke(main, ["export", "masks", "--manifest", manifest, "--cache", cache, "--out", str(out), *extra])


def test_export_writes_one_binary_png_per_frame_of_every_clip_and_split(trained_run, predicted, tmp_path):
    rows = read_manifest(trained_run["manifest"]).to_dict("records")
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    stored = _arrays(predicted["path"])
    for size in (224, 112):
        out = tmp_path / f"png{size}"
        result = _export(trained_run["manifest"], predicted["cache"], out, "--size", str(size))
        assert result.exit_code == 0, result.output + result.stderr
        files = sorted(glob.glob(str(out / "**" / "*.png"), recursive=True))
        expected = sorted(str(out / r["subset"] / r["clip_id"] / f"{i}.png") for r in rows for i in range(int(r["num_frames"])))
        assert files == expected
        for path in files:
            with Image.open(path) as im:
                assert im.mode == "L" and im.size == (size, size)
                mask = np.asarray(im)
            assert set(np.unique(mask)) <= {0, 255}
        # foreground where p > 0.5, p = stored / 255 (at the cached size: the same pixels)
        if size == 224:
            for r in rows:
                for i in range(int(r["num_frames"])):
                    mask = np.asarray(Image.open(out / r["subset"] / r["clip_id"] / f"{i}.png"))
                    np.testing.assert_array_equal(mask == 255, stored[r["clip_id"]][i] >= 128)
    # a lower threshold marks at least as many pixels
    low = _export(trained_run["manifest"], predicted["cache"], tmp_path / "low", "--threshold", "0.3")
    assert low.exit_code == 0

    def count(folder):
        return sum(int((np.asarray(Image.open(p)) == 255).sum()) for p in glob.glob(str(folder / "**" / "*.png"), recursive=True))

    assert count(tmp_path / "low") >= count(tmp_path / "png224")


def test_export_replaces_each_clip_folder_whole(trained_run, predicted, tmp_path):
    """What a killed export leaves (a partial hidden folder, a clip folder with a stray temporary
    file) is gone after the next export: each clip folder holds exactly its frames."""
    row = read_manifest(trained_run["manifest"]).to_dict("records")[0]
    out = tmp_path / "out"
    clip = out / row["subset"] / row["clip_id"]
    partial = out / row["subset"] / f".{row['clip_id']}.partial"
    for folder in (clip, partial):
        folder.mkdir(parents=True)
        (folder / f"0.png.tmp{os.getpid()}").write_bytes(b"half a png")
    result = _export(trained_run["manifest"], predicted["cache"], out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(clip)) == [f"{i}.png" for i in range(int(row["num_frames"]))]
    assert sorted(os.listdir(out / row["subset"])) == sorted(
        r["clip_id"] for r in read_manifest(trained_run["manifest"]).to_dict("records") if r["subset"] == row["subset"]
    )


def test_export_names_a_clip_without_masks(trained_run, predicted, tmp_path):
    rows = read_manifest(trained_run["manifest"]).to_dict("records")
    with_new = str(tmp_path / "with_new.csv")
    absolute_manifest(trained_run["manifest"], with_new)
    df = read_manifest(with_new)
    df.loc[0, "clip_id"] = missing = "never_computed_1"
    df.to_csv(with_new, index=False)
    refused = _export(with_new, predicted["cache"], tmp_path / "out")
    assert refused.exit_code == 1 and f"{missing}: not computed" in refused.stderr
    assert not os.path.exists(tmp_path / "out")
    allowed = _export(with_new, predicted["cache"], tmp_path / "out2", "--allow-missing")
    assert allowed.exit_code == 0 and missing in allowed.stderr
    assert not os.path.exists(tmp_path / "out2" / rows[0]["subset"] / missing)
    written = glob.glob(str(tmp_path / "out2" / "*" / "*"))
    assert len(written) == len(rows) - 1


def test_import_of_an_exported_set_reproduces_the_cache(trained_run, predicted, tmp_path):
    from soundstage.stages.masks import binary_masks

    exported = tmp_path / "exported"
    assert _export(trained_run["manifest"], predicted["cache"], exported).exit_code == 0
    imported = _run_masks(trained_run["manifest"], str(tmp_path / "cache"), **{"import": str(exported)})
    assert imported.ok and imported.done == len(read_manifest(trained_run["manifest"]))
    stored, back = _arrays(predicted["path"]), _arrays(imported.path)
    assert sorted(stored) == sorted(back)
    for cid, probs in stored.items():
        np.testing.assert_array_equal(back[cid], binary_masks(probs, 224, 0.5))
    # exporting the imported set and importing it again: the same files, the same output
    again = tmp_path / "again"
    assert _export(trained_run["manifest"], str(tmp_path / "cache"), again, "--masks", imported.fingerprint).exit_code == 0
    second = _run_masks(trained_run["manifest"], str(tmp_path / "cache3"), **{"import": str(again)})
    assert second.fingerprint == imported.fingerprint
    for cid, probs in _arrays(second.path).items():
        np.testing.assert_array_equal(probs, back[cid])


def test_import_validates_size_values_and_every_frame(trained_run, predicted, tmp_path):
    rows = read_manifest(trained_run["manifest"]).to_dict("records")
    exported = tmp_path / "exported"
    assert _export(trained_run["manifest"], predicted["cache"], exported).exit_code == 0
    gone, small, grey = rows[0], rows[1], rows[2]
    os.remove(exported / gone["subset"] / gone["clip_id"] / "3.png")
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(exported / small["subset"] / small["clip_id"] / "0.png")
    Image.fromarray(np.full((224, 224), 128, np.uint8)).save(exported / grey["subset"] / grey["clip_id"] / "1.png")
    summary = _run_masks(trained_run["manifest"], str(tmp_path / "cache"), **{"import": str(exported)})
    causes = dict(summary.failed)
    assert sorted(causes) == sorted([gone["clip_id"], small["clip_id"], grey["clip_id"]])
    assert "frame 3 of" in causes[gone["clip_id"]] and "3.png" in causes[gone["clip_id"]]
    assert "100x100, expected 224x224" in causes[small["clip_id"]]
    assert "only 0 and 255" in causes[grey["clip_id"]]
    assert summary.done == len(rows) - 3
