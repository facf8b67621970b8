"""bias_in_AVS: our model against their code's outputs (tests/fixtures/recipes/bias_in_avs.pt, see
tests/recipe_fixtures.py), the active-query weights and the focal loss against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recipe_fixtures import load_fixture, seeded, seeded_state_dict

from soundstage.models.seeds.bias_in_avs import active_weights, focal_loss, key_map
from soundstage.train.recipes import load_reference

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
