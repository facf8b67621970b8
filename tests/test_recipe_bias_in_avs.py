"""bias_in_AVS: our model against their code's outputs (tests/fixtures/recipes/bias_in_avs.pt, see
tests/recipe_fixtures.py), the active-query weights and the focal loss against their definitions."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from fixtures_synth import synth_dir  # noqa: F401 (a fixture)
from recipe_fixtures import load_fixture, seeded, seeded_state_dict

import soundstage.train.assemble as assemble
from soundstage.manifests.table import read_manifest
from soundstage.metrics import Accumulator
from soundstage.models.seeds.bias_in_avs import active_weights, focal_loss, key_map
from soundstage.models.tiny import build_vggish
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import resolve_config
from soundstage.train.cues import active_cue
from soundstage.train.evaluation import protocols_for
from soundstage.train.recipes import load_reference
from soundstage.train.recipes.bias_in_avs import frame_noise, mask2former_arguments
from soundstage.train.run_eval import evaluate_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    fixture = load_fixture("bias_in_avs")
    return fixture, load_reference("bias-in-avs", seeded_state_dict(fixture), fixture["config"])


@pytest.mark.parametrize("t", [99])  # the fixture also holds t = 37 (a training step's t), checked the same way
def test_reference_forward_equals_their_code(reference, t):
    fixture, model = reference
    seed = fixture["seed"]
    frames = len(fixture["active_ids"])
    out = model.reference_forward(
        seeded((frames, 3, 384, 384), seed + 1),
        seeded((frames, 128), seed + 2),
        fixture["active_ids"],
        tuple(fixture["image_size"]),
        seeded((frames, 256), seed + 3),
        t,
    )
    want = fixture["cases"][t]
    assert out["pred"].shape == (frames, 256, 256)
    assert out["class_queries_logits"].shape == (frames, 2, 100, 23)
    torch.testing.assert_close(out["pred"][:, ::4, ::4], want["pred"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out["class_queries_logits"], want["class_queries_logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out["masks_queries_logits"][:, :, ::4, ::8, ::8], want["masks_queries_logits"], atol=TOLERANCE, rtol=0
    )
    gt = seeded((frames, 256, 256), seed + 4) > 0.3
    assert abs(float(model.reference_loss(out, gt)) - float(want["loss"])) < TOLERANCE


def test_their_key_layout_maps_onto_ours(reference):
    fixture, model = reference
    mapped = key_map(seeded_state_dict(fixture))
    ours = model.state_dict()
    assert set(mapped) <= set(ours)
    assert "mask2former.model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0.attention.swin_adapt_1.0.weight" in mapped
    assert key_map(ours) is ours  # our own layout passes unchanged


def test_active_weights_follow_their_one_hot_encoding():
    ids = [torch.tensor([42]), torch.tensor([3, 5, 3]), torch.tensor([], dtype=torch.long)]
    weights = active_weights(ids, 100)
    assert weights[0, 0] == pytest.approx(1 - 1e-6) and weights[0, 42] == pytest.approx(1e-6)  # one id: query 0
    assert weights[1, 3] == pytest.approx(1 - 1e-6)  # duplicates add, then the clamp
    assert weights[1, 5] == pytest.approx(1 - 1e-6) and weights[1, 0] == pytest.approx(1e-6)
    assert torch.allclose(weights[2], torch.full((100,), 1e-6))
    padded = active_weights(np.array([[42, -1, -1], [3, 5, 3]]), 100)  # the cache's padded form
    np.testing.assert_array_equal(padded, weights[:2].numpy())


def test_focal_loss_is_their_formula():
    logits, target = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    p = torch.sigmoid(logits)
    expected = (0.25 * (1 - p) ** 2 * -torch.log(p)).mean()
    assert float(focal_loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)


class _ActiveLists(dict):
    """An active-queries output in memory: clip id -> {query_ids, frame_lengths}."""

    meta = {"stage": "active-queries", "fingerprint": "test"}


def test_evaluate_scores_a_checkpoint_in_their_key_layout(synth_dir, tmp_path, monkeypatch):  # noqa: F811
    """Their layout (the fixture's state dict fits the recipe's tiny stand-in), scored through the
    caches with every binary protocol; the paper's protocol equals the model run by hand."""
    fixture = load_fixture("bias_in_avs")
    checkpoint = str(tmp_path / "their.pth")
    torch.save(seeded_state_dict(fixture), checkpoint)
    manifest = os.path.join(synth_dir, "manifest.csv")
    vggish = build_vggish(str(tmp_path / "vggish.pth"))
    cache = str(tmp_path / "cache")
    assert run_stage(get_stage("vggish"), manifest, cache, {"checkpoint": vggish}, progress=False, log=lambda *_: None).ok
    rows = read_manifest(manifest)
    lists = {
        cid: [[t % 9], [3, 40, 3], *[[t, 60]] * (int(n) - 2)]
        for t, (cid, n) in enumerate(zip(rows["clip_id"], rows["num_frames"]))
    }
    active = _ActiveLists(
        {
            cid: {
                "query_ids": np.array([q for ids in frames for q in ids], np.int32),
                "frame_lengths": np.array([len(ids) for ids in frames], np.int32),
            }
            for cid, frames in lists.items()
        }
    )
    real_open_cues = assemble.open_cues

    def open_cues(cfg, recorded=None, log=print):
        cues = real_open_cues(dataclasses.replace(cfg, active=None), recorded, log)
        return {**cues, "active": (active_cue("active-queries"), active)}

    monkeypatch.setattr(assemble, "open_cues", open_cues)
    result = evaluate_checkpoint("bias-in-avs", checkpoint, manifest, cache, split="val", probes=[], log=lambda *_: None)
    assert result["protocols"][0] == "bias-in-avs" and set(result["protocols"]) == set(protocols_for("binary"))
    assert set(result["eval"]) == {"real"}

    model = load_reference("bias-in-avs", seeded_state_dict(fixture), mask2former_arguments(22))
    cfg = resolve_config(None, {"recipe": "bias-in-avs", "manifest": manifest, "cache": cache, "out": str(tmp_path)})
    data = assemble.dataset(cfg, open_cues(cfg), "val", num_queries=100, active_encoding=active_weights)
    accumulator = Accumulator("bias-in-avs", pred_kind="logits")
    for item in data:
        noise = torch.stack([frame_noise(f"{item['clip_id']}/{int(f)}", 0, 256) for f in item["frames"]])
        with torch.no_grad():
            out = model(item["pixel_values"], item["audio"], item["active"], noise=noise, t=99, image_size=item["image_hw"])
        accumulator.update(out["pred"], item["labels"], videos=[item["clip_id"]] * len(item["labels"]))
    expected = accumulator.compute()
    got = result["eval"]["real"]["bias-in-avs"]
    assert got["miou"] == pytest.approx(float(expected["miou"]), abs=1e-6)
    assert got["fscore"] == pytest.approx(float(expected["fscore"]), abs=1e-6)


def test_avss_reference_forward_equals_their_code():
    """Their AVSS PmpAVS (``AVSS/models/avs_model.py``, 75-class head, t = 99): both passes' logits
    and the semantic map (the clean classes × sigmoid of the debiased masks, argmax at the image size)."""
    fixture = load_fixture("bias_in_avs_avss")
    model = load_reference("bias-in-avs-avss", seeded_state_dict(fixture), fixture["config"])
    seed = fixture["seed"]
    out = model.reference_forward(
        seeded((2, 3, 384, 384), seed + 1),
        seeded((2, 128), seed + 2),
        fixture["active_ids"],
        tuple(fixture["image_size"]),
        seeded((2, 256), seed + 3),
        99,
    )
    want = fixture["cases"][99]
    torch.testing.assert_close(out["class_queries_logits"], want["class_queries_logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out["masks_queries_logits"][:, :, ::4, ::8, ::8], want["masks_queries_logits"], atol=TOLERANCE, rtol=0
    )
    assert torch.equal(out["pred"][:, ::2, ::2].to(torch.uint8), want["pred"])
