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


def get_stage(name: str):
    """The ``Stage`` declaration registered under ``name``."""
    try:
        module = STAGE_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}") from None
    return importlib.import_module(module).STAGE
