"""Stepping Stones' mask prior: where it enters the model (checked against computations made
here), and training / evaluating with it (ground truth in training, cached stage-1 masks at
evaluation)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_synth import synth_dir  # noqa: F401
from fixtures_trained import train_tiny, trained_run  # noqa: F401

from soundstage.models.avs_mask2former import build_model


def _smooth_prior(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blobs in [0, 1] with values in every region (<= 0.4, between, >= 0.6)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 4, 4), generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def test_prior_enters_mask_features_first_attention_mask_and_position_embeddings():
    model = build_model(None, 2, "add", 16, prior=True, seed=1).eval()
    transformer = model.mask2former.model.transformer_module
    decoder = transformer.decoder
    seen = {}
    # before the model's own hook (prepend): what transformers computed; after it: what the decoder gets
    decoder.register_forward_pre_hook(lambda m, a, k: seen.update(before={**k}), with_kwargs=True, prepend=True)
    decoder.register_forward_pre_hook(lambda m, a, k: seen.update(after={**k}), with_kwargs=True)
    model.mask2former.model.pixel_level_module.register_forward_hook(lambda m, a, out: seen.update(pixel=out))
    decoder.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(first=k["encoder_attention_mask"]), with_kwargs=True)
    decoder.layers[1].register_forward_pre_hook(lambda m, a, k: seen.update(second=k["encoder_attention_mask"]), with_kwargs=True)
    pixels, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 16)
    prior = _smooth_prior(2, 64)
    with torch.no_grad():
        out = model(pixels, audio=audio, prior=prior)

    def resized(size):
        return F.interpolate(prior[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]

    # mask features: the pixel decoder's output + the prior, on every channel
    features = seen["pixel"].decoder_last_hidden_state
    expected = features + resized(features.shape[-2:])[:, None]
    torch.testing.assert_close(seen["after"]["pixel_embeddings"], expected)

    # position embeddings: + the embedding of the region each position's prior falls in
    weights = model.conditioner.prior.regions.weight
    for before, after, size in zip(
        seen["before"]["multi_stage_positional_embeddings"],
        seen["after"]["multi_stage_positional_embeddings"],
        seen["after"]["feature_size_list"],
    ):
        p = resized(size).flatten(1).T.numpy()  # [h*w, N]
        region = np.where(p <= 0.4, 0, np.where(p >= 0.6, 2, 1))
        assert set(np.unique(region)) == {0, 1, 2}
        torch.testing.assert_close(after, before + weights[torch.from_numpy(region)])

    # first masked-attention mask: prior < 0.5, for every head and query; later layers: the model's own
    size0 = seen["after"]["feature_size_list"][0]
    heads, queries = decoder.mask_predictor.num_heads, model.config.num_queries
    masked = (resized(size0) < 0.5).flatten(1)
    assert masked.any() and not masked.all(1).any()
    expected_mask = masked[:, None, None].expand(-1, heads, queries, -1).reshape(2 * heads, queries, -1)
    assert torch.equal(seen["first"].bool(), expected_mask)
    assert not torch.equal(seen["second"].bool(), seen["first"].bool())

    # and the output depends on the prior
    with torch.no_grad():
        other = model(pixels, audio=audio, prior=_smooth_prior(2, 64, seed=5))
    assert (out.masks_queries_logits - other.masks_queries_logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass prior"):
        model(pixels, audio=audio)
    with pytest.raises(ValueError, match="without a mask prior"):
        build_model(None, 2, "add", 16)(pixels, audio=audio, prior=prior)


def test_training_with_the_prior_runs_and_the_prior_changes_the_output(trained_run, tmp_path):
    from soundstage.cache import open_stage
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage
    from soundstage.train import assemble
    from soundstage.train.config import ConfigError
    from soundstage.train.data import collate_frames
    from soundstage.train.evaluation import model_inputs
    from soundstage.train.inference import open_trained
    from soundstage.train.run_eval import evaluate_saved_run, load_run, run_model

    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.join(trained_run["cache"], "vggish"), cache / "vggish")
    masks = run_stage(
        get_stage("masks"),
        trained_run["manifest"],
        str(cache),
        {"run": trained_run["run"], "device": "cpu"},
        progress=False,
        log=lambda *_: None,
    )
    assert masks.ok
    run = train_tiny(trained_run["manifest"], str(cache), str(tmp_path / "stage2"), prior="masks")
    config = json.load(open(os.path.join(run, "config.json")))
    assert (config["prior"], config["prior_train"], config["prior_eval"]) == ("masks", "gt", "masks")
    provenance = json.load(open(os.path.join(run, "provenance.json")))
    assert provenance["cues"]["prior"]["fingerprint"] == masks.fingerprint
    assert os.path.exists(os.path.join(run, "DONE"))

    rundir, cfg, recorded = load_run(run)
    cues = assemble.open_cues(cfg, recorded=recorded, log=lambda *_: None)
    train_set = assemble.dataset(cfg, cues, cfg.train_split, num_queries=8, training=True)
    eval_set = assemble.dataset(cfg, cues, cfg.eval_split, num_queries=8)
    # training frames: the ground truth as prior; evaluated frames: the cached stage-1 masks
    item = train_set[0]
    assert torch.equal(item["prior"], (item["labels"] != 0).float())
    item = eval_set[0]
    stored = open_stage(masks.path)[item["clip_id"]]["probs"][item["frames"].numpy()].astype(np.float32) / 255
    assert item["prior"].shape == item["labels"].shape
    assert abs(float(item["prior"].mean()) - float(stored.mean())) < 0.02  # a resize keeps the mean

    model, _ = run_model(rundir, cfg, cues)
    model.eval()
    batch = collate_frames([eval_set[0]])
    with torch.no_grad():
        with_masks = model(**model_inputs(batch, "cpu")).masks_queries_logits
        batch["prior"] = torch.ones_like(batch["prior"])
        with_ones = model(**model_inputs(batch, "cpu")).masks_queries_logits
    assert (with_masks - with_ones).abs().max() > 1e-3

    result = evaluate_saved_run(run, device="cpu", log=lambda *_: None)
    assert result["frames"] > 0 and result["miou"] is not None
    with pytest.raises(ConfigError, match="mask prior"):
        open_trained(run, device="cpu", log=lambda *_: None)
