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
