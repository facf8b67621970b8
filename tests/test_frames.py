"""The frames stage (each frame resized once, uint8), training reading it instead of decoding,
and bias_in_AVS's processed bundles written from it: checked against transformers' own
Mask2Former image processor and against the decoding path, item by item."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from soundstage.cache import open_stage
from soundstage.cache.table import read_manifest
from soundstage.cli import main
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import frame_path, label_path
from soundstage.models.tiny import build_vggish
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import TrainConfig
from soundstage.train.cues import CueError
from soundstage.train.data import AVSClips

QUIET = {"workers": 0, "progress": False, "log": lambda *_: None}
SIZE = 64


@pytest.fixture(scope="module")
def frames_cache(tmp_path_factory):
    """A synthetic dataset with its frames at SIZE and its VGGish embeddings in one cache."""
    root = tmp_path_factory.mktemp("frames")
    manifest = make_synthetic_dataset(str(root / "data"), clips=10, seed=3, workers=0)
    cache = str(root / "cache")
    frames = run_stage(get_stage("frames"), manifest, cache, {"size": SIZE}, **QUIET)
    assert frames.ok and frames.done == 10
    checkpoint = build_vggish(root / "vggish.pth", seed=0)
    vggish = run_stage(get_stage("vggish"), manifest, cache, {"checkpoint": checkpoint, "device": "cpu"}, **QUIET)
    assert vggish.ok
    return manifest, cache, frames.path, vggish.path


def processor(size):
    # the reference: transformers' own image processor (PIL backend; the default one needs torchvision)
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    return Mask2FormerImageProcessorPil(size={"height": size, "width": size})


def test_cached_frames_are_the_image_processors_resize(frames_cache):
    manifest, _, frames_dir, _ = frames_cache
    reader, reference = open_stage(frames_dir), processor(SIZE)
    manifest_dir = os.path.dirname(manifest)
    for row in read_manifest(manifest).to_dict("records"):
        record = reader[row["clip_id"]]
        pixels = record["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape == (int(row["num_frames"]), SIZE, SIZE, 3)
        for i in (0, len(pixels) - 1):
            with Image.open(frame_path(row, i, manifest_dir)) as im:
                expected = reference(im, return_tensors="pt")["pixel_values"][0].numpy()
                assert tuple(record["source_size"][i]) == (im.height, im.width)
            # rescaled and normalised as the processor does: its pixel_values exactly
            mean, std = np.array(reference.image_mean, np.float32), np.array(reference.image_std, np.float32)
            ours = ((pixels[i].astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
            np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_training_items_from_the_cache_equal_decoded_ones(frames_cache):
    manifest, _, frames_dir, _ = frames_cache
    from soundstage.cache.reader import StageReader

    for split, unlabelled in (("train", "repeat"), ("test", "first")):
        decoded = AVSClips(manifest, split, {}, SIZE, unlabelled=unlabelled)
        cached = AVSClips(manifest, split, {}, SIZE, unlabelled=unlabelled)
        assert cached.use_frames(StageReader(frames_dir, fields=["pixels"]), required=True)
        assert len(decoded) == len(cached) > 0
        for a, b in zip(decoded, cached):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    # an output at another size, or one without every clip, is not used
    with pytest.raises(CueError, match="size 64, the model's input is 32"):
        AVSClips(manifest, "train", {}, 32).use_frames(StageReader(frames_dir, fields=["pixels"]), required=False)


def test_frames_setting_auto_cache_decode(frames_cache, tmp_path):
    from soundstage.train import assemble

    manifest, cache, frames_dir, _ = frames_cache
    config = TrainConfig(manifest=manifest, cache=cache, image_size=SIZE, audio=None, conditioning="none")
    assert assemble.dataset(config, {}, "train").frames is not None  # auto: the cache holds them
    assert assemble.dataset(TrainConfig(**{**config.to_dict(), "frames": "decode"}), {}, "train").frames is None
    other = TrainConfig(**{**config.to_dict(), "image_size": 32})
    assert assemble.dataset(other, {}, "train").frames is None  # auto: none at that size, decoded
    with pytest.raises(CueError, match="frames: cache: no frames output matching"):
        assemble.dataset(TrainConfig(**{**other.to_dict(), "frames": "cache"}), {}, "train")
    assert assemble.frames_provenance(config)["fingerprint"] == os.path.basename(frames_dir)


def test_m2f_bundles_load_as_bias_in_avs_reads_them(frames_cache, tmp_path):
    manifest, cache, frames_dir, vggish_dir = frames_cache
    out = tmp_path / "AVS_m2f_processed"
    args = ["export", "m2f-bundles", "--manifest", manifest, "--cache", cache, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "note: images are 64 x 64; bias_in_AVS's model views pixel_values as 384 x 384" in result.output
    reference, embeddings = processor(SIZE), open_stage(vggish_dir)
    manifest_dir = os.path.dirname(manifest)
    rows = read_manifest(manifest).to_dict("records")
    assert sorted(os.listdir(out)) == sorted({r["subset"] for r in rows})
    for row in rows:
        ver, vid = row["subset"], row["clip_id"]
        # their loader: torch.load(".../AVS_m2f_processed/" + ver + "/" + vid + ".pth"), unpacked as
        img_recs, feat_aud, mask_recs, image_sizes, name = torch.load(f"{out}/{ver}/{vid}.pth", weights_only=True)
        assert name == vid and len(img_recs) == len(mask_recs) == 5
        chosen = [0] * 5 if (ver == "v1s" and row["split"] == "train") else list(range(5))
        for image, mask, f in zip(img_recs, mask_recs, chosen):
            with Image.open(frame_path(row, f, manifest_dir)) as im:
                expected = reference(im, return_tensors="pt")
                size = im.size[::-1]
            assert image["pixel_values"].shape == (1, 3, SIZE, SIZE) and image["pixel_mask"].shape == (1, SIZE, SIZE)
            torch.testing.assert_close(image["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
            assert torch.equal(image["pixel_mask"], expected["pixel_mask"])
            with Image.open(label_path(row, f, manifest_dir)) as lab:
                gt = np.asarray(lab.resize((256, 256), Image.NEAREST)) > 0
            assert mask.dtype == torch.float32 and torch.equal(mask, torch.from_numpy(gt.astype(np.float32)))
        assert image_sizes == [size]
        want = embeddings[vid]["embeddings"]
        assert feat_aud.shape == (10 if ver == "v2" else 5, want.shape[1])
        np.testing.assert_array_equal(feat_aud.numpy()[: len(want)], want[: len(feat_aud)])


def test_normalized_values_are_the_formula_bit_for_bit():
    from soundstage.train.data import IMAGENET_MEAN, IMAGENET_STD, normalized

    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    formula = ((pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert np.array_equal(normalized(pixels), formula)
