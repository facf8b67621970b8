"""The synthetic AVSBench dataset: layout, determinism, and that audio decides the masks."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures_synth import metadata_rows, synth_dir  # noqa: F401  (synth_dir is a fixture)
from PIL import Image

from soundstage.cli import main
from soundstage.manifests.palette import class_index, label2idx, palette
from soundstage.manifests.synth import CLASSES, FADE_SECONDS, make_synthetic_dataset, shape_mask

# Where each class's sound has its energy (Hz), written independently of the generator's code.
PROBE_BANDS = {
    "car": (60, 150),
    "guitar": (190, 202),
    "helicopter": (294, 306),
    "violin": (425, 455),
    "piano": (518, 528),
    "clock": (1400, 1600),
    "bird": (2200, 3800),
    "vacuum-cleaner": (5200, 6800),
}


def truth(root: str) -> dict:
    with open(os.path.join(root, "synthetic_truth.json")) as f:
        return json.load(f)["clips"]


def all_files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_layout_and_identities(synth_dir):
    rows = metadata_rows(synth_dir)
    assert list(rows[0]) == ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
    with open(os.path.join(synth_dir, "label2idx.json")) as f:
        assert json.load(f) == label2idx()
    for row in rows:
        if row["label"] == "v2":
            match = re.fullmatch(r"([A-Za-z0-9_-]{11})_(\d+)_(\d+)", row["uid"])
            assert match and match.group(1) == row["vid"] and int(match.group(3)) - int(match.group(2)) == 10000
        elif row["label"] == "v1s":
            assert re.fullmatch(re.escape(row["vid"]) + r"_\d", row["uid"])
        else:  # v1m: the real release keys MS3 clips by their uid
            assert row["vid"] == row["uid"] and re.fullmatch(r"[A-Za-z0-9_-]{11}_\d", row["uid"])
        assert set(row["a_obj"].split("_")) <= set(CLASSES)
    v2_vids = [r["vid"] for r in rows if r["label"] == "v2"]
    assert len(set(v2_vids)) < len(v2_vids), "several v2 uids should share one vid"


def test_same_seed_same_bytes_and_another_seed_differs(synth_dir, tmp_path):
    again = str(tmp_path / "again")
    make_synthetic_dataset(again, clips=12, seed=0)
    assert all_files(again) == all_files(synth_dir)
    other = str(tmp_path / "other")
    make_synthetic_dataset(other, clips=3, seed=1)
    assert metadata_rows(other)[0]["uid"] != metadata_rows(synth_dir)[0]["uid"]


@pytest.mark.parametrize("shape", sorted({v[0] for v in CLASSES.values()}))
def test_every_shape_lies_within_its_radius(shape):
    """The generator evaluates shapes only inside the box of half-size r around the centre."""
    yy, xx = np.mgrid[0:101, 0:101]
    mask = shape_mask(shape, 50.3, 49.6, 30.0, xx, yy)
    assert mask.sum() > 300
    assert not mask[(np.abs(xx - 50.3) > 30.0) | (np.abs(yy - 49.6) > 30.0)].any()


def test_mixed_audio_formats(synth_dir):
    formats = set()
    for uid, clip in truth(synth_dir).items():
        info = sf.info(os.path.join(synth_dir, clip["subset"], uid, "audio.wav"))
        assert (info.samplerate, info.channels) == (clip["sample_rate"], clip["channels"])
        assert info.frames == info.samplerate * (5 if clip["subset"] != "v2" else 10)
        formats.add((info.samplerate, info.channels))
    assert formats == {(16000, 1), (44100, 2), (48000, 1)}


def test_masks_show_exactly_the_sounding_objects(synth_dir):
    colours = palette()
    for uid, clip in truth(synth_dir).items():
        folder = os.path.join(synth_dir, clip["subset"], uid)
        yy, xx = np.mgrid[0 : clip["height"], 0 : clip["width"]]
        for name in os.listdir(os.path.join(folder, "labels_semantic")):
            frame = int(name.split(".")[0])
            semantic = np.asarray(Image.open(os.path.join(folder, "labels_semantic", name)))
            rgb = np.asarray(Image.open(os.path.join(folder, "labels_rgb", name)).convert("RGB"))
            assert semantic.ndim == 2 and np.array_equal(rgb, colours[semantic])
            expected = np.zeros_like(semantic)
            for obj in clip["objects"]:
                if obj["sounding"][frame]:
                    cx, cy = obj["centres"][frame]
                    expected[shape_mask(CLASSES[obj["class"]][0], cx, cy, obj["radius"], xx, yy)] = class_index(obj["class"])
            assert np.array_equal(semantic, expected), (uid, frame)


def test_audio_sounds_exactly_in_the_sounding_seconds(synth_dir):
    """Per second, the energy in each present class's band is high iff the truth says it sounds."""
    checked = 0
    for uid, clip in truth(synth_dir).items():
        wave, sr = sf.read(os.path.join(synth_dir, clip["subset"], uid, "audio.wav"), always_2d=True)
        mono = wave.mean(axis=1)
        edge = int(FADE_SECONDS * sr)  # the gate's ramps reach this far into a second; left out
        freqs = np.fft.rfftfreq(sr - 2 * edge, 1 / sr)
        window = np.hanning(sr - 2 * edge)
        for second in range(len(mono) // sr):
            power = np.abs(np.fft.rfft(mono[second * sr + edge : (second + 1) * sr - edge] * window)) ** 2
            total = power.sum()
            if total == 0:  # a second in which nothing sounds is digital silence
                assert not any(obj["sounding"][second] for obj in clip["objects"]), (uid, second)
                checked += len(clip["objects"])
                continue
            for obj in clip["objects"]:
                low, high = PROBE_BANDS[obj["class"]]
                share = power[(freqs >= low) & (freqs <= high)].sum() / total
                if obj["sounding"][second]:
                    assert share > 0.02, (uid, obj["class"], second, share)
                else:
                    assert share < 0.002, (uid, obj["class"], second, share)
                checked += 1
    assert checked > 100


def test_a_model_that_ignores_audio_is_measurably_wrong(synth_dir):
    """Segmenting every visible object (perfectly) scores well below segmenting the sounding ones."""
    ious, frames_with_silent_object = [], 0
    for uid, clip in truth(synth_dir).items():
        folder = os.path.join(synth_dir, clip["subset"], uid)
        yy, xx = np.mgrid[0 : clip["height"], 0 : clip["width"]]
        for name in os.listdir(os.path.join(folder, "labels_semantic")):
            frame = int(name.split(".")[0])
            gt = np.asarray(Image.open(os.path.join(folder, "labels_semantic", name))) > 0
            visible = np.zeros_like(gt)
            for obj in clip["objects"]:
                cx, cy = obj["centres"][frame]
                visible |= shape_mask(CLASSES[obj["class"]][0], cx, cy, obj["radius"], xx, yy)
            frames_with_silent_object += bool((visible & ~gt).any())
            ious.append((visible & gt).sum() / (visible | gt).sum())
    assert frames_with_silent_object >= 0.3 * len(ious)
    assert np.mean(ious) < 0.8


def test_cli_synth_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["manifest", "synth", str(foreign), "--clips", "3"])
    assert result.exit_code == 1 and "not empty" in result.output
    assert os.listdir(foreign) == ["keep.txt"]

    out = str(tmp_path / "synth")
    first = CliRunner().invoke(main, ["manifest", "synth", out, "--clips", "4", "--seed", "5"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, ["manifest", "synth", out, "--clips", "3", "--seed", "5"])
    assert second.exit_code == 0, second.output
    assert len(metadata_rows(out)) == 3
    assert sum(len(os.listdir(os.path.join(out, s))) for s in ("v1s", "v1m", "v2") if os.path.isdir(os.path.join(out, s))) == 3


@pytest.mark.parametrize("clips", [1, 9, 40])
def test_clip_counts(tmp_path, clips):
    from soundstage.manifests.synth import _allocate

    plan = _allocate(clips)
    assert len(plan) == clips
    if clips >= 9:
        assert len(set(plan)) == 9
