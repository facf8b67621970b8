"""SegPref: our model against their code's outputs (tests/fixtures/recipes/segpref.pt, see
tests/recipe_fixtures.py: made by running ``SegPref/models/avs_model.py::AVS_Model_Base`` on pip
transformers 4.30.2 with a tiny random Mask2Former), their checkpoint layout, the gated block
against its formula, and the recipe's loss / prediction / parameter groups on a tiny model."""

from __future__ import annotations

import dataclasses
import os
import types

import numpy as np
import pytest
import torch
from fixtures_synth import synth_dir  # noqa: F401 (a fixture)
from recipe_fixtures import load_fixture, seeded, seeded_state_dict

import soundstage.models.seeds.segpref as sp
import soundstage.train.assemble as assemble
from soundstage.manifests.table import read_manifest
from soundstage.metrics import Accumulator
from soundstage.models.seeds.base import UNUSED_BACKBONE_NORM, mask2former_from_config
from soundstage.models.tiny import build_vggish, tiny_config
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import resolve_config
from soundstage.train.cues import text_cue
from soundstage.train.recipes import get_recipe, load_reference
from soundstage.train.run_eval import evaluate_checkpoint

TOLERANCE = 1e-4
FRAMES = 2


@pytest.fixture(scope="module")
def reference():
    fixture = load_fixture("segpref")
    return fixture, load_reference("segpref", seeded_state_dict(fixture), fixture["config"])


def test_reference_forward_and_loss_equal_their_code(reference):
    fixture, model = reference
    seed = fixture["seed"]
    out = model.reference_forward(
        seeded((FRAMES, 3, 384, 384), seed + 1), seeded((FRAMES, 128), seed + 2), seeded((FRAMES, 4, 1024), seed + 3)
    )
    assert out["pred"].shape == (FRAMES, 256, 256)
    assert out["class_queries_logits"].shape == (FRAMES, 100, fixture["config"]["num_labels"] + 1)
    torch.testing.assert_close(out["class_queries_logits"], fixture["class_queries_logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out["masks_queries_logits"][:, ::4, ::8, ::8], fixture["masks_queries_logits"], atol=TOLERANCE, rtol=0
    )
    # pred sums 100 raw mask logits (|pred| up to ~30 here): float32 rounding of that sum is ~1e-5
    torch.testing.assert_close(out["pred"][:, ::4, ::4], fixture["pred"], atol=TOLERANCE, rtol=0)
    gt = seeded((FRAMES, 256, 256), seed + 4) > 0.3
    assert abs(float(model.reference_loss(out, gt)) - float(fixture["loss"])) < TOLERANCE


def test_their_key_layout_maps_onto_ours(reference):
    fixture, model = reference
    theirs = seeded_state_dict(fixture)
    assert set(theirs) == set(fixture["state_keys"])
    mapped = sp.key_map(theirs)
    assert not any(k.startswith(("mha_A_T.", "mha_V_T.", "mha_mm.")) for k in mapped)  # never called: dropped
    ours = model.state_dict()
    assert set(mapped) <= set(ours) and set(ours) - set(mapped) <= {
        f"model_v.model.pixel_level_module.{k}" for k in UNUSED_BACKBONE_NORM
    }
    assert "model_v.model.transformer_module.ref_avs_attn.beta_source_pool" in mapped and "ca.out_projection.weight" in mapped
    assert "model_v.model.pixel_level_module.decoder.encoder.layers.0.self_attn.avs_adapt.2.weight" in mapped
    assert not any("swin_adapt" in k for k in ours)
    assert sp.key_map(ours) is ours


def test_gated_block_is_their_formula():
    torch.manual_seed(0)
    block = sp.GatedCrossAttention(8, num_heads=2)
    with torch.no_grad():
        block.beta_source_attn.fill_(0.3)
        block.beta_source_pool.fill_(-1.0)
    target, source = torch.randn(3, 2, 8), torch.randn(2, 5, 8)  # [Lt, N, D], [N, Ls, D]
    q = block.query_embedding(target.transpose(0, 1)).view(2, 3, 2, 4).transpose(1, 2)
    k = block.key_embedding(source).view(2, 5, 2, 4).transpose(1, 2)
    v = block.value_embedding(source).view(2, 5, 2, 4).transpose(1, 2)
    attended = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v  # head_dim 4: scaling 1/2
    out = block.out_projection(attended.transpose(1, 2).reshape(2, 3, 8)).transpose(0, 1)
    expected = target + torch.sigmoid(torch.tensor(0.3)) * out + torch.sigmoid(torch.tensor(-1.0)) * source.mean(1)[None]
    torch.testing.assert_close(block(target, source), expected)


def tiny_model() -> sp.SegPref:
    torch.manual_seed(0)
    config = {**tiny_config("mask2former")["config"], "num_labels": 2, "id2label": {0: "0", 1: "1"}}
    return sp.SegPref(mask2former_from_config(config), audio_dim=128, text_dim=16)


def test_recipe_trains_their_modules_and_predicts_their_map():
    recipe = get_recipe("segpref")
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.int64)
    labels[:, 8:24, 8:24] = 1
    batch = {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=generator),
        "audio": torch.randn(2, 128, generator=generator),
        "text": torch.randn(2, 4, 16, generator=generator),
        "labels": labels,
    }
    (group,) = recipe.parameter_groups(model, types.SimpleNamespace(recipe_options={"train_text_audio": False}))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model_v.model.transformer_module.ref_avs_attn.beta_source_attn" in names and "text_proj.0.weight" in names
    assert not any(n.startswith("ca.") for n in names)  # their training leaves the text->audio block as built
    assert (
        "model_v.class_predictor.weight" not in names and "model_v.model.transformer_module.queries_features.weight" not in names
    )
    optimizer = torch.optim.AdamW(group["params"], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = recipe.loss(model, batch, "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        pred = recipe.predict(model.eval(), batch, "cpu", (32, 32), "binary", False)
    assert pred.shape == (2, 32, 32)
    recipe.parameter_groups(model, types.SimpleNamespace(recipe_options={"train_text_audio": True}))
    assert model.ca.query_embedding.weight.requires_grad


class _TextCues(dict):
    """A textcues output in memory (slots=segpref): clip id -> {cues [frames, 4, 1024], cue_mask}."""

    meta = {"stage": "textcues", "fingerprint": "test"}


def test_evaluate_scores_a_checkpoint_in_their_key_layout(synth_dir, tmp_path, monkeypatch):  # noqa: F811
    """Their state dict (``mha_*`` included) on a base model folder of the fixture's config, scored
    through a towhee-VGGish cache and text cues with every binary protocol; their protocol equals the
    reference model run by hand."""
    fixture = load_fixture("segpref")
    checkpoint = str(tmp_path / "ckpt_best_miou.pth")
    torch.save(seeded_state_dict(fixture), checkpoint)
    base = str(tmp_path / "base")
    mask2former_from_config(fixture["config"]).save_pretrained(base)
    manifest = os.path.join(synth_dir, "manifest.csv")
    cache = str(tmp_path / "cache")
    vggish = {"checkpoint": build_vggish(str(tmp_path / "vggish.pth")), "variant": "towhee"}
    assert run_stage(get_stage("vggish"), manifest, cache, vggish, progress=False, log=lambda *_: None).ok
    rows = read_manifest(manifest)
    text = _TextCues(
        {
            cid: {"cues": seeded((int(n), 4, 1024), k).numpy(), "cue_mask": np.ones((int(n), 4), bool)}
            for k, (cid, n) in enumerate(zip(rows["clip_id"], rows["num_frames"]))
        }
    )
    real_open_cues = assemble.open_cues

    def open_cues(cfg, recorded=None, log=print):
        cues = real_open_cues(dataclasses.replace(cfg, text_cues=False), recorded, log)
        return {**cues, "text": (text_cue(), text)}

    monkeypatch.setattr(assemble, "open_cues", open_cues)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"manifest: {manifest}\ncache: {cache}\ntrain:\n  image_size: 192\n")  # small; windows fit
    result = evaluate_checkpoint(
        "segpref", checkpoint, pipeline_file=str(pipeline), split="val", model=base, probes=[], log=lambda *_: None
    )
    assert result["protocols"][0] == "segpref"

    model = load_reference("segpref", seeded_state_dict(fixture), fixture["config"])
    cfg = resolve_config(str(pipeline), {"recipe": "segpref", "model": base, "out": "."})
    items = list(assemble.dataset(cfg, open_cues(cfg), "val", num_queries=100))
    assert len(items) <= cfg.eval_batch_size  # one batch, as evaluate runs it: the same numbers to the last bit
    labels = torch.cat([item["labels"] for item in items])
    pred = model.reference_forward(*(torch.cat([item[k] for item in items]) for k in ("pixel_values", "audio", "text")))["pred"]
    accumulator = Accumulator("segpref", pred_kind="logits")
    accumulator.update(pred, labels, videos=[item["clip_id"] for item in items for _ in item["labels"]])
    expected = accumulator.compute()
    got = result["eval"]["real"]["segpref"]
    assert got["miou"] == pytest.approx(float(expected["miou"]), abs=1e-6)
    assert got["fscore"] == pytest.approx(float(expected["fscore"]), abs=1e-6)
