"""The recipe framework: registry, settings precedence, options (soundstage.train.recipes)."""

from __future__ import annotations

import pytest
import torch

from soundstage.train.checkpoint import WeightsError, content_digest, read_state_dict
from soundstage.train.config import ConfigError, resolve_config
from soundstage.train.recipes import Option, RecipeError, get_recipe, recipes


def test_generic_is_the_default_recipe(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("clip_id\n")
    cfg = resolve_config(None, {"out": str(tmp_path / "run"), "manifest": str(manifest), "cache": str(tmp_path)})
    assert cfg.recipe == "generic" and cfg.recipe_options == {}
    assert "generic" in recipes()


def test_unknown_recipe_and_option_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        resolve_config(None, {"recipe": "nope", "manifest": "m.csv", "cache": "c"})
    with pytest.raises(ConfigError, match="recipe generic has no option x"):
        resolve_config(None, {"recipe_options": {"x": "1"}, "manifest": "m.csv", "cache": "c"})
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("nope")


def test_options_are_typed_and_checked():
    assert Option(False).parse("debias", "true") is True
    assert Option(0.5).parse("w", "2") == 2.0
    assert Option("paper", choices=("paper", "script")).parse("t", "script") == "script"
    with pytest.raises(RecipeError, match="not one of paper, script"):
        Option("paper", choices=("paper", "script")).parse("t", "other")
    with pytest.raises(RecipeError, match="not of type int"):
        Option(3).parse("n", "x")


def test_recipe_settings_sit_between_a_generic_train_section_and_the_command_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("clip_id\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"manifest: {manifest}\ncache: {tmp_path}\ntrain:\n  lr: 0.003\n  task: binary\n  eval_every: 7\n")
    cfg = resolve_config(str(pipeline), {"recipe": "bias-in-avs-avss", "epochs": 2})
    assert (cfg.lr, cfg.task, cfg.protocol) == (1e-4, "semantic", "avsbench-semantic")  # the paper's, not the section's
    assert (cfg.epochs, cfg.eval_every) == (2, 7)  # the command line, and what the recipe does not set
    assert cfg.recipe_options == {"trainable": "paper"}
    pipeline.write_text(f"manifest: {manifest}\ncache: {tmp_path}\ntrain:\n  recipe: bias-in-avs\n  lr: 0.003\n")
    assert resolve_config(str(pipeline), {}).lr == 0.003  # a section written for the recipe wins
    assert resolve_config(str(pipeline), {"lr": 0.5}).lr == 0.5


def test_init_weights_reads_only_tensor_state_dicts(tmp_path):
    recipe = get_recipe("bias-in-avs")
    text = tmp_path / "notes.pth"
    text.write_text("not torch")
    with pytest.raises(WeightsError, match="not a torch weights file"):
        read_state_dict(str(text), recipe)
    mixed = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "b": 3}, mixed)
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_state_dict(str(mixed), recipe)
    theirs = tmp_path / "theirs.pth"
    torch.save({"model_v.model.pixel_level_module.encoder.encoder.layers.0.blocks.0.output.dense.weight": torch.ones(2)}, theirs)
    assert list(read_state_dict(str(theirs), recipe)) == [
        "mask2former.model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0.mlp.fc2.weight"
    ]
    ours = tmp_path / "checkpoint.pt"
    state = {"model": {"audio_proj.0.weight": torch.ones(2)}, "step": 3, "rng": {}}
    torch.save({**state, "sha256": content_digest(state)}, ours)
    assert list(read_state_dict(str(ours), recipe)) == ["audio_proj.0.weight"]
    torch.save({**state, "sha256": "0" * 64}, ours)
    with pytest.raises(WeightsError, match="does not match the checksum"):
        read_state_dict(str(ours), recipe)
