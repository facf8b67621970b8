"""Training recipes: each seed method (and soundstage's own model) as a declaration.

A recipe says everything the one training loop (``soundstage.train.loop``) and the evaluation
need to train, score and load one method, so the loop knows no method by name::

    RECIPE = Recipe(
        name="bias-in-avs",
        summary="bias_in_AVS (ACM MM 2024) for AVS: ...",
        settings={"lr": 5e-4, "epochs": 150, "task": "binary", "audio": "vggish", ...},
        options={"trainable": Option("paper", "what is trained: paper | script", ("paper", "script"))},
        build=build,            # (cfg: TrainConfig, cues: dict) -> model (an nn.Module with .config)
        loss=loss,              # (model, batch: dict, device, split_loss=None, step=0, weight=1.0) -> scalar,
                                #   or {"loss": scalar, "<part>": ...} with parts adding up to it
        predict=predict,        # (model, batch, device, size, task, two_channel) -> eval logits
        trainable=trainable,    # (model, cfg) -> optimizer parameter groups (frozen = absent)
        load=load,              # (folder) -> model saved by model.save_pretrained(folder)
        key_map=key_map,        # their checkpoint's state dict -> ours
        reference=reference,    # (state_dict in their layout, Mask2FormerConfig dict | None) -> module
        active_encoding=enc,    # (ids [T, k] int, -1 = none; num_queries) -> [T, Q] float weights
        protocol="bias-in-avs", # the paper's evaluation protocol (soundstage.metrics)
        unused_keys=(...),      # key suffixes of ours a checkpoint may lack (weights never used)
    )

- ``settings``: the paper's values of ``TrainConfig`` fields; precedence is command line > the
  pipeline file's ``train:`` section > the recipe's settings > ``TrainConfig``'s defaults, so every
  one stays overridable (``soundstage train --recipe NAME --lr 1e-4``).
- ``options``: settings of this recipe alone (``--recipe-option name=value``), checked and
  typed from their declaration and stored in ``config.json`` (``recipe_options``).
- ``build`` reads the cue widths from ``cues`` (role -> (CueSpec, StageReader)); the model's
  ``forward`` is what ``loss`` and ``predict`` call, so DDP wraps it as any model.
- ``loss`` gets the DDP-wrapped model in training: it must call ``model(...)`` once per micro-batch.
- ``predict`` returns what ``soundstage.metrics`` scores: ``[N, H, W]`` foreground logits for
  binary tasks (two-channel protocols get ``[N, 2, H, W]`` when ``two_channel``), ``[N, C, H, W]``
  class scores for semantic ones, at ``size``.
- ``reference(state_dict, mask2former_config)`` returns a module whose ``reference_forward(...)``
  takes the tensors the seed code's forward takes for one clip and returns its outputs (see
  each recipe's module); tests compare it with the seed code on stored fixtures.

Adding a recipe: write ``soundstage/train/recipes/<method>.py`` with its model in
``soundstage/models/seeds/<method>.py`` (composition around transformers' Mask2Former: hooks and
added submodules, no copy of its code), declare ``RECIPES = [Recipe(...), ...]`` there and add the
module name to ``RECIPE_MODULES`` below. A lab's own package can add recipes through the entry
point group ``soundstage.recipes`` (each entry point: a module with ``RECIPES``).
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

from soundstage.train.recipes.recipe import Option, Recipe, RecipeError  # noqa: F401 (the declaration, re-exported)

#: modules of this package declaring ``RECIPES`` (in the order ``soundstage train --help`` lists them)
RECIPE_MODULES = ("generic", "bias_in_avs", "stepping_stones", "segpref")
ENTRY_POINT_GROUP = "soundstage.recipes"
DEFAULT_RECIPE = "generic"


def _load_registry() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    modules = [importlib.import_module(f"{__name__}.{m}") for m in RECIPE_MODULES if _exists(m)]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        modules.append(ep.load())
    for module in modules:
        for recipe in getattr(module, "RECIPES", []):
            if recipe.name in found:
                raise RecipeError(f"recipe {recipe.name!r} is declared twice ({module.__name__})")
            found[recipe.name] = recipe
    return found


def _exists(module: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{module}") is not None


_REGISTRY: dict[str, Recipe] | None = None


def recipes() -> dict[str, Recipe]:
    """name -> Recipe, every declared recipe."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load_registry()
    return _REGISTRY


def get_recipe(name: str | None) -> Recipe:
    known = recipes()
    name = name or DEFAULT_RECIPE
    if name not in known:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(known)}")
    return known[name]


def load_reference(name: str, state_dict: dict, mask2former_config: dict | None = None):
    """The recipe's model loaded from a state dict in the seed code's key layout, as a module
    with ``reference_forward(...)`` (and ``reference_loss(...)`` where the recipe has one).

    ``mask2former_config``: Mask2FormerConfig arguments (``backbone_config`` a dict inside) of
    the model the state dict belongs to; None = the recipe's real base model (a local folder or
    the Hugging Face cache: nothing is downloaded)."""
    recipe = get_recipe(name)
    if recipe.reference is None:
        raise RecipeError(f"recipe {name} has no reference interface")
    module = recipe.reference(state_dict, mask2former_config)
    return module.eval()
