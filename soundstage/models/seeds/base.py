"""What the seed models share: building their Mask2Former, saving and loading them, and loading a
state dict of the seed code into them.

A seed model (``SeedModel``) holds the transformers Mask2Former under the attribute its seed code
uses (``MASK2FORMER``) and the constructor keyword arguments it was built with (``settings``);
``save_pretrained(dir)`` writes ``<FILE_STEM>.json`` (the settings and the Mask2Former config) and
``<FILE_STEM>.pt`` (a plain state dict, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

REAL_BASE = "facebook/mask2former-swin-base-ade-semantic"  # the base model of every seed method
#: today's Swin backbone has a final norm the Mask2Former backbone never uses (not in 4.3x checkpoints)
UNUSED_BACKBONE_NORM = ("encoder.swin.layernorm.weight", "encoder.swin.layernorm.bias")


def mask2former_from_config(arguments: dict):
    """A randomly initialised Mask2Former from Mask2FormerConfig arguments (``backbone_config`` a dict)."""
    arguments = dict(arguments)
    backbone = arguments.get("backbone_config")
    if isinstance(backbone, dict):
        backbone = dict(backbone)
        backbone.pop("model_type", None)
        arguments["backbone_config"] = SwinConfig(**backbone)
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**arguments))


#: transformers 4.3x's Mask2FormerLoss built its Hungarian matcher with a class cost of 1.0 whatever
#: ``class_weight`` (today's uses ``class_weight``: 2.0 for these models); the seed code ran 4.30 / 4.35
LEGACY_MATCHER_CLASS_COST = 1.0


def legacy_matcher(mask2former) -> None:
    """Match queries to targets as the seed code's transformers did (``LEGACY_MATCHER_CLASS_COST``)."""
    mask2former.criterion.matcher.cost_class = LEGACY_MATCHER_CLASS_COST


def reference_mask2former(mask2former_config: dict | None, **overrides):
    """``load_reference``'s Mask2Former: from Mask2FormerConfig arguments, or (None) the real base
    model from a local folder or the Hugging Face cache (nothing is downloaded) with ``overrides``."""
    if mask2former_config is not None:
        return mask2former_from_config(mask2former_config)

    if overrides:
        overrides = {"ignore_mismatched_sizes": True, **overrides}
    return Mask2FormerForUniversalSegmentation.from_pretrained(REAL_BASE, local_files_only=True, **overrides)


def load_seed_state(model: nn.Module, state: dict, method: str) -> nn.Module:
    """``state`` (already in our layout) into ``model``: every key must be used and every tensor of
    ours present, except the Swin norm the backbone never uses."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(UNUSED_BACKBONE_NORM)]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"state dict does not fit the {method} model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model


class SeedModel(nn.Module):
    """Saving and loading of a seed model (see the module docstring)."""

    FILE_STEM = "seed"
    MASK2FORMER = "mask2former"
    settings: dict

    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        config = getattr(self, self.MASK2FORMER).config.to_dict()
        with open(os.path.join(out_dir, f"{self.FILE_STEM}.json"), "w", encoding="utf-8") as f:
            json.dump({"settings": self.settings, "mask2former": config}, f, indent=1)
        torch.save(self.state_dict(), os.path.join(out_dir, f"{self.FILE_STEM}.pt"))

    @classmethod
    def from_pretrained(cls, path: str):
        config_path = os.path.join(path, f"{cls.FILE_STEM}.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path} holds no {cls.FILE_STEM}.json: not a model saved by its recipe")
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
        model = cls(mask2former_from_config(saved["mask2former"]), **saved["settings"])
        state = torch.load(os.path.join(path, f"{cls.FILE_STEM}.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model
