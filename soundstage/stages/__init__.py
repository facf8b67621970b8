"""soundstage's own stages: one module per stage, each defining ``STAGE``.

They are registered like any plugin's, as entry points of the group ``soundstage.stages`` in
``setup.cfg`` (the engine's registry, ``soundstage.pipeline.registry``, reads them).
TO ADD A STAGE: add a line ``name = soundstage.stages.module:STAGE`` under
``[options.entry_points] soundstage.stages`` in setup.cfg, then ``pip install -e . --no-deps``.
"""

from soundstage.pipeline.registry import STAGE_MODULES, get_stage, register_stage, stages_of  # noqa: F401

#: the stages shipped in the package (plugins and ``register_stage`` add others beside them)
BUILTIN_STAGES = stages_of("soundstage")
