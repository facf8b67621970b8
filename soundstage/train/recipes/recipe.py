"""The recipe declaration (see ``soundstage.train.recipes``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Option:
    """A setting of one recipe (``--recipe-option name=value``)."""

    default: Any
    help: str = ""
    choices: tuple | None = None

    def parse(self, name: str, value):
        kind = type(self.default)
        if isinstance(value, str) and kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise RecipeError(f"recipe option {name}: {value!r} is not true or false")
            value = value.lower() in ("true", "1", "yes")
        elif isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value)
            except ValueError:
                raise RecipeError(f"recipe option {name}: {value!r} is not of type {kind.__name__}") from None
        if self.choices and value not in self.choices:
            raise RecipeError(f"recipe option {name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    build: Callable
    loss: Callable
    predict: Callable
    load: Callable
    trainable: Callable | None = None  # None: every parameter with requires_grad, one group
    settings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    key_map: Callable | None = None
    reference: Callable | None = None
    active_encoding: Callable | None = None  # None: multi-hot (soundstage.train.data.active_weights)
    protocol: str | None = None  # None: by task (avsbench-binary / avsbench-semantic)
    unused_keys: tuple = ()  # suffixes of our model's keys a checkpoint may lack (weights the model never uses)
    split_invariant_loss: bool = False  # the loss supports soundstage.train.distributed.SplitInvariantLoss

    def resolved_options(self, given: dict | None) -> dict:
        """The recipe's options with ``given`` (strings from the command line, or typed values)
        parsed and checked; unknown names are an error."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise RecipeError(f"recipe {self.name} has no option {', '.join(unknown)} (its options: {known})")
        return {name: opt.parse(name, given.get(name, opt.default)) for name, opt in self.options.items()}

    def parameter_groups(self, model, cfg) -> list[dict]:
        if self.trainable is not None:
            return self.trainable(model, cfg)
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
