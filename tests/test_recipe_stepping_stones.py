"""Stepping Stones: our stage-1 and stage-2 models against their code's outputs
(tests/fixtures/recipes/stepping_stones_stage{1,2}.pt, see tests/recipe_fixtures.py: made by running
``avs/avs_model.py::AdaptiveAVS`` / ``avss/avs_model.py::AdaptiveAVS`` with their vendored
transformers 4.35.2 on a tiny random config), their post-processing on varied logits, their
checkpoint layout, and the recipe's loss / prediction / parameter groups on a tiny model."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch
from fixtures_synth import synth_dir  # noqa: F401 (a fixture)
from PIL import Image
from recipe_fixtures import load_fixture, seeded, seeded_state_dict
from torch.nn import functional as F

import soundstage.models.seeds.stepping_stones as ss
import soundstage.train.assemble as assemble
from soundstage.metrics import Accumulator
from soundstage.models.seeds.base import UNUSED_BACKBONE_NORM, mask2former_from_config
from soundstage.models.tiny import build_vggish, tiny_config
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train.config import resolve_config
from soundstage.train.evaluation import protocols_for
from soundstage.train.recipes import get_recipe, load_reference
from soundstage.train.run_eval import evaluate_checkpoint

TOLERANCE = 1e-4
FRAMES = 2


def fixture_prior(seed: int) -> torch.Tensor:
    """The fixture's prior: a smooth map in (0, 1) with all three regions (the generator's rule)."""
    small = torch.sigmoid(2 * seeded((FRAMES, 1, 14, 14), seed + 3))
    return F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module", params=[1, 2])
def reference(request):
    stage = request.param
    fixture = load_fixture(f"stepping_stones_stage{stage}")
    return stage, fixture, load_reference(f"stepping-stones-stage{stage}", seeded_state_dict(fixture), fixture["config"])


def test_reference_forward_equals_their_code(reference):
    stage, fixture, model = reference
    seed = fixture["seed"]
    prior = fixture_prior(seed) if stage == 2 else None
    pixel_values, audio = seeded((FRAMES, 3, 384, 384), seed + 1), seeded((FRAMES, 128), seed + 2)
    out = model.reference_forward(pixel_values, audio, prior, (224, 224))
    queries, labels = fixture["config"]["num_queries"], fixture["config"]["num_labels"]
    assert out["class_queries_logits"].shape == (FRAMES, queries, labels + 1)
    assert out["masks_queries_logits"].shape == (FRAMES, queries, 96, 96)
    torch.testing.assert_close(out["class_queries_logits"], fixture["class_queries_logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out["masks_queries_logits"][:, :, ::4, ::4], fixture["masks_queries_logits"], atol=TOLERANCE, rtol=0
    )
    if stage == 1:
        assert out["pred"].shape == (FRAMES, 2, 224, 224)
        torch.testing.assert_close(out["pred"][:, :, ::4, ::4], fixture["pred"], atol=TOLERANCE, rtol=0)
    else:  # a class map: equal wherever the two best classes are not within the tolerance
        assert out["pred"].shape == (FRAMES, 224, 224)
        scores = ss.SteppingStones.semantic_scores(model(pixel_values, audio, prior), (224, 224), (384, 384))
        top2 = scores.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > TOLERANCE
        assert clear.float().mean() > 0.9
        assert torch.equal(out["pred"][clear], fixture["pred"].long()[clear])


def test_training_loss_equals_their_code(reference):
    """Their ``AdaptiveAVS`` in training mode with their image processor's targets (two frames, a
    box each; stage 2 with the ground truth as prior), the same torch seed for the loss's random
    points: the same loss (the matching included, with transformers 4.35's class cost of 1)."""
    stage, fixture, model = reference
    seed = fixture["seed"]
    labels = torch.zeros(FRAMES, 224, 224, dtype=torch.int64)
    labels[0, 30:120, 40:150] = 1 if stage == 1 else 3
    labels[1, 100:200, 10:90] = 1 if stage == 1 else 4
    values = {
        "pixel_values": seeded((FRAMES, 3, 384, 384), seed + 1),
        "audio": seeded((FRAMES, 128), seed + 2),
        "labels": labels,
        "clip_ids": ["clip"],
        "clip_index": torch.zeros(FRAMES, dtype=torch.int64),
    }
    if stage == 2:
        values["prior"] = (labels != 0).float()
    model.train()
    try:
        torch.manual_seed(fixture["train_loss"]["torch_seed"])
        with torch.no_grad():
            loss = get_recipe(f"stepping-stones-stage{stage}").loss(model, values, "cpu")
    finally:
        model.eval()
    assert abs(float(loss) - float(fixture["train_loss"]["loss"])) < TOLERANCE


def test_post_processing_equals_their_image_processor(reference):
    """Their ``post_process_binary_segmentation`` (stage 1) / ``post_process_semantic_segmentation``
    (stage 2) on varied logits, where the random model's class map is nearly uniform."""
    stage, fixture, _ = reference
    masks = F.interpolate(fixture["postprocess_small_masks"], size=(96, 96), mode="bilinear", align_corners=False)
    outputs = types.SimpleNamespace(class_queries_logits=fixture["postprocess_class_logits"], masks_queries_logits=masks)
    if stage == 1:
        scores = ss.SteppingStones.binary_scores(outputs, (224, 224))
        torch.testing.assert_close(scores[:, :, ::4, ::4], fixture["postprocess_pred"], atol=TOLERANCE, rtol=0)
    else:
        classes = ss.SteppingStones.semantic_scores(outputs, (224, 224)).argmax(1)
        assert len(torch.unique(classes)) == 5
        assert torch.equal(classes, fixture["postprocess_pred"].long())


def test_their_key_layout_maps_onto_ours(reference):
    stage, fixture, model = reference
    theirs = seeded_state_dict(fixture)
    assert list(theirs) == fixture["state_keys"] or set(theirs) == set(fixture["state_keys"])
    mapped = ss.key_map(theirs)
    ours = model.state_dict()
    assert set(mapped) <= set(ours) and set(ours) - set(mapped) <= {
        f"model.model.pixel_level_module.{k}" for k in UNUSED_BACKBONE_NORM
    }
    block = "model.model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0"
    assert f"{block}.attention.swin_adapt_1.0.weight" in mapped and f"{block}.mlp.swin_adapt_3.2.bias" in mapped
    assert "model.model.transformer_module.decoder.layers.0.self_attn.avs_adapt.0.weight" in mapped
    # stage 1 skips these projections, but their weights are in the checkpoint and load
    assert "model.model.transformer_module.decoder.layers.0.self_attn.out_proj.weight" in mapped
    assert ("prior.regions.weight" in mapped) == (stage == 2)
    assert ss.key_map(ours) is ours


@pytest.mark.parametrize("stage", [1, 2])
def test_stage1_skips_the_projections_stage2_applies_them(stage):
    """Changing ``out_proj`` of the decoder's self-attention changes stage 2's output and not stage 1's."""
    model = tiny_model(stage).eval()
    values = {k: v[:1] for k, v in batch(stage).items() if k in ("pixel_values", "audio", "prior")}
    projection = model.model.model.transformer_module.decoder.layers[0].self_attn.out_proj
    with torch.no_grad():
        before = model(**values).class_queries_logits
        projection.weight.mul_(3)
        after = model(**values).class_queries_logits
    assert torch.equal(before, after) == (stage == 1)


def test_prior_regions_and_first_attention_mask_follow_their_thresholds():
    """Region embeddings at p <= 0.4 / in between / p >= 0.6 (boundaries included as theirs), and
    the first attention mask masked where p < 0.5, computed independently on a 2x2 prior."""
    model = tiny_model(2)
    with torch.no_grad():
        model.prior.regions.weight.copy_(torch.tensor([1.0, 10.0, 100.0])[:, None])  # silence, uncertain, audio
    prior = torch.tensor([[[0.4, 0.41], [0.59, 0.6]]])
    (regions,) = model.prior.position_embeddings([torch.zeros(4, 1, model.config.hidden_dim)], [(2, 2)], prior)
    assert regions[:, 0, 0].tolist() == [1.0, 10.0, 10.0, 100.0]
    predictor = model.model.model.transformer_module.decoder.mask_predictor
    queries, heads = model.config.num_queries, predictor.num_heads
    mask = torch.zeros(heads, queries, 4, dtype=torch.bool)
    with model.prior.applied(prior):
        _, replaced = model.prior._first_attention_mask_hook(predictor, (None, None, (2, 2)), (None, mask))
        assert replaced.shape == (heads, queries, 4) and replaced[0, 0].tolist() == [True, True, False, False]
        assert model.prior._first_attention_mask_hook(predictor, (None, None, (2, 2)), (None, mask))[1] is mask  # first only
    theirs = {
        f"model.model.transformer_module.{n}.weight": torch.full((1, 3), float(i)) for i, n in enumerate(ss.REGION_EMBEDDINGS)
    }
    theirs["model.model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.query.weight"] = torch.zeros(1)
    assert ss.key_map(theirs)["prior.regions.weight"][:, 0].tolist() == [0.0, 1.0, 2.0]


def test_loss_targets_are_their_image_processors():
    """Their Mask2FormerImageProcessor resizes the label map with PIL's nearest neighbour, then makes
    one mask per class present: the same as ``mask_targets`` (checked against PIL directly)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 224, 224, dtype=torch.int64)
    labels[0, 30:121, 41:150] = 1
    labels[1, 100:201, 13:90] = 7
    labels[1, 5:17, 5:219] = torch.randint(1, 71, (), generator=generator)
    masks, classes = ss.mask_targets(labels, (384, 384))
    for frame, mask, cls in zip(labels, masks, classes):
        resized = torch.from_numpy(np.array(Image.fromarray(frame.numpy().astype(np.uint8)).resize((384, 384), Image.NEAREST)))
        expected = torch.unique(resized.long())
        assert torch.equal(cls, expected)
        assert torch.equal(mask, (resized[None].long() == expected[:, None, None]).float())


# ------------------------------------------------------------------------------------ the recipe


def tiny_model(stage: int) -> ss.SteppingStones:
    torch.manual_seed(0)
    labels = ss.STAGE_SHAPES[stage]["num_labels"]
    config = {**tiny_config("mask2former")["config"], "num_labels": labels, "id2label": {i: str(i) for i in range(labels)}}
    return ss.SteppingStones(mask2former_from_config(config), stage=stage, audio_dim=128)


def batch(stage: int, empty_clip: bool = False) -> dict:
    generator = torch.Generator().manual_seed(stage)
    labels = torch.zeros(4, 16, 16, dtype=torch.int64)
    labels[:, 4:12, 4:12] = 1 if stage == 1 else 7
    if empty_clip:
        labels[2:] = 0
    values = {
        "pixel_values": torch.randn(4, 3, 64, 64, generator=generator),
        "audio": torch.randn(4, 128, generator=generator),
        "labels": labels,
        "clip_ids": ["a", "b"],
        "clip_index": torch.tensor([0, 0, 1, 1]),
    }
    if stage == 2:
        values["prior"] = (labels != 0).float()
    return values


@pytest.mark.parametrize("stage", [1, 2])
def test_recipe_trains_their_modules_and_predicts_their_outputs(stage):
    recipe = get_recipe(f"stepping-stones-stage{stage}")
    model = tiny_model(stage)
    cfg = types.SimpleNamespace(recipe_options={"phase": 1}, lr=1e-3, seed=0)
    (group,) = recipe.parameter_groups(model, cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("swin_adapt" not in n for n in names) and any("audio_proj" in n for n in names)
    assert ("model.model.transformer_module.queries_features.weight" in names) == (stage == 1)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "swin_adapt" in n)
    optimizer = torch.optim.AdamW([group], lr=group["lr"])
    losses = []
    for _ in range(3):
        loss = recipe.loss(model, batch(stage), "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        pred = recipe.predict(model, batch(stage), "cpu", (16, 16), "binary" if stage == 1 else "semantic", stage == 1)
    assert pred.shape == ((4, 2, 16, 16) if stage == 1 else (4, 71, 16, 16))
    phase2 = types.SimpleNamespace(recipe_options={"phase": 2}, lr=1e-3, seed=0)
    (group,) = recipe.parameter_groups(model, phase2)
    assert group["lr"] == pytest.approx(1e-4)
    adapters = [p for n, p in model.named_parameters() if "swin_adapt" in n and n.endswith("weight")]
    assert all(p.requires_grad and float(p.detach().abs().sum()) > 0 for p in adapters)  # started afresh, trained


def test_stage1_loss_leaves_out_a_clip_with_empty_ground_truth():
    recipe = get_recipe("stepping-stones-stage1")
    model = tiny_model(1).eval().requires_grad_(False)
    values = batch(1, empty_clip=True)
    torch.manual_seed(1)
    with_empty = recipe.loss(model, values, "cpu")
    first = {k: v[:2] if torch.is_tensor(v) and len(v) == 4 else v for k, v in values.items()}
    first["clip_ids"], first["clip_index"] = ["a"], torch.tensor([0, 0])
    torch.manual_seed(1)
    assert float(with_empty) == pytest.approx(float(recipe.loss(model, first, "cpu")))
    only_empty = {**first, "labels": torch.zeros_like(first["labels"])}
    assert float(recipe.loss(model, only_empty, "cpu")) == 0.0


def test_evaluate_scores_a_stage1_checkpoint_in_their_key_layout(synth_dir, tmp_path):  # noqa: F811
    """Their layout at the stage's 30 queries (the fixture's generator with those shapes) on a base
    model folder of the fixture's config, scored through a towhee-VGGish cache with every binary
    protocol; their protocol equals the reference model run by hand."""
    fixture = load_fixture("stepping_stones_stage1")
    queries = ss.STAGE_SHAPES[1]["num_queries"]
    params = {
        k: ([queries, v[1]] if k.endswith(("queries_embedder.weight", "queries_features.weight")) else v)
        for k, v in fixture["params"].items()
    }
    state = seeded_state_dict({**fixture, "params": params})
    checkpoint = str(tmp_path / "f_miou_best.pth")
    torch.save(state, checkpoint)
    config = {**fixture["config"], "num_queries": queries}
    base = str(tmp_path / "base")
    mask2former_from_config(config).save_pretrained(base)
    manifest = os.path.join(synth_dir, "manifest.csv")
    cache = str(tmp_path / "cache")
    vggish = {"checkpoint": build_vggish(str(tmp_path / "vggish.pth")), "variant": "towhee"}
    assert run_stage(get_stage("vggish"), manifest, cache, vggish, progress=False, log=lambda *_: None).ok
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"manifest: {manifest}\ncache: {cache}\ntrain:\n  image_size: 192\n"
    )  # small; every Swin stage still holds a window
    result = evaluate_checkpoint(
        "stepping-stones-stage1", checkpoint, pipeline_file=str(pipeline), split="val", model=base, probes=[], log=lambda *_: None
    )
    assert result["protocols"][0] == "stepping-stones" and set(result["protocols"]) == set(protocols_for("binary"))

    model = load_reference("stepping-stones-stage1", state, config)
    cfg = resolve_config(
        None, {"recipe": "stepping-stones-stage1", "manifest": manifest, "cache": cache, "model": base, "out": "."}
    )
    items = list(assemble.dataset(cfg, assemble.open_cues(cfg, log=lambda *_: None), "val", num_queries=queries))
    assert len(items) <= cfg.eval_batch_size  # one batch, as evaluate runs it: the same numbers to the last bit
    labels = torch.cat([item["labels"] for item in items])
    pixels, audio = (torch.cat([item[k] for item in items]) for k in ("pixel_values", "audio"))
    pred = model.reference_forward(pixels, audio, None, tuple(labels.shape[-2:]))["pred"]
    accumulator = Accumulator("stepping-stones", pred_kind="logits")
    accumulator.update(pred, labels, videos=[item["clip_id"] for item in items for _ in item["labels"]])
    expected = accumulator.compute()
    got = result["eval"]["real"]["stepping-stones"]
    assert got["miou"] == pytest.approx(float(expected["miou"]), abs=1e-6)
    assert got["fscore"] == pytest.approx(float(expected["fscore"]), abs=1e-6)
