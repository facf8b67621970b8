"""One module per stage; each defines ``STAGE``. This table is the registry (name -> module)."""

import importlib

STAGE_MODULES = {
    "audio-stats": "soundstage.stages.audio_stats",
    "hubert": "soundstage.stages.hubert",
    "kmeans": "soundstage.stages.kmeans",
    "units": "soundstage.stages.units",
    "beats": "soundstage.stages.beats",
    "caption": "soundstage.stages.caption",
    "sources": "soundstage.stages.sources",
    "textcues": "soundstage.stages.textcues",
}
#: the stages shipped in the package (``register_stage`` adds others beside them)
BUILTIN_STAGES = tuple(STAGE_MODULES)


def register_stage(name: str, module: str) -> None:
    """Add a stage defined outside the package (a plugin, or a test's toy stage).

    ``module`` is a module path whose ``STAGE`` is the declaration, or ``module:ATTRIBUTE``."""
    STAGE_MODULES[name] = module


def get_stage(name: str):
    """The ``Stage`` declaration registered under ``name``."""
    try:
        module = STAGE_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}") from None
    module, _, attr = module.partition(":")
    return getattr(importlib.import_module(module), attr or "STAGE")
