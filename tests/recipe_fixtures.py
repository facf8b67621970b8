"""Stored fixtures of the seed methods' own code (tests/fixtures/recipes/*.pt).

Each was made by running the seed repository's code (with its vendored transformers) on a tiny
random config, outside this repository: weights are not stored but generated from the seed by
``seeded_state_dict`` (the same rule was used there), inputs likewise by ``seeded``; the fixture
holds the parameter names and shapes in the seed code's key layout, its buffers, the small inputs
(active ids, sizes) and the outputs (subsampled where large) the tests compare with."""

from __future__ import annotations

import os
import zlib

import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "recipes")


def load_fixture(name: str) -> dict:
    return torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)


def seeded(shape, seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def parameter_value(name: str, shape, seed: int) -> torch.Tensor:
    """Matrices: N(0, 1/fan_in); norm weights 1 + N(0, 0.01); other vectors N(0, 0.01)."""
    x = seeded(shape, zlib.crc32(name.encode()) + seed)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return x / fan_in**0.5
    return 1 + 0.1 * x if ("norm" in name and name.endswith("weight")) else 0.1 * x


def seeded_state_dict(fixture: dict) -> dict:
    """The seed code's state dict (its key layout) the fixture was made with."""
    state = {name: parameter_value(name, shape, fixture["seed"]) for name, shape in fixture["params"].items()}
    state.update(fixture["buffers"])
    return state
