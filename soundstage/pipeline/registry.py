"""The stage registry: stage name -> where its ``Stage`` declaration lives.

It is filled from Python entry points of the group ``soundstage.stages`` (``name =
module:ATTRIBUTE``), so any installed package can add a stage and get the CLI, the cache,
resume and SLURM with it; soundstage's own stages are registered the same way, in its
``setup.cfg``. ``register_stage`` adds one at run time (tests, notebooks). Declarations are
imported only when asked for, so listing the stages imports no model code.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "soundstage.stages"

#: stage name -> "module" (its ``STAGE``) or "module:ATTRIBUTE"
STAGE_MODULES: dict[str, str] = {}
#: stage name -> the distribution (installed package) whose entry point registered it
STAGE_DISTRIBUTIONS: dict[str, str] = {}


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STAGE_MODULES:
            continue  # the first installed wins; a duplicate name would be ambiguous anyway
        STAGE_MODULES[ep.name] = ep.value
        dist = getattr(ep, "dist", None)
        STAGE_DISTRIBUTIONS[ep.name] = dist.metadata["Name"] if dist is not None else ""


_load_entry_points()


def register_stage(name: str, module: str) -> None:
    """Add a stage defined outside any installed entry point (a test's or a notebook's stage).

    ``module`` is a module path whose ``STAGE`` is the declaration, or ``module:ATTRIBUTE``."""
    STAGE_MODULES[name] = module


def stages_of(distribution: str) -> tuple[str, ...]:
    """Names of the stages that the installed package ``distribution`` registers."""
    return tuple(name for name, dist in STAGE_DISTRIBUTIONS.items() if dist == distribution)


def get_stage(name: str):
    """The ``Stage`` declaration registered under ``name``."""
    try:
        module = STAGE_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}") from None
    module, _, attr = module.partition(":")
    return getattr(importlib.import_module(module.strip()), attr.strip() or "STAGE")
