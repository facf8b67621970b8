"""The recipe framework: registry, settings precedence, options (soundstage.train.recipes)."""

from __future__ import annotations

import pytest

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
