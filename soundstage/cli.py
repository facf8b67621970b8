"""The ``soundstage`` command: one subcommand per stage, plus manifest/run/status/verify/cache/tags.

Subcommands are imported only when used, so ``soundstage --help`` does not import torch.
"""

from __future__ import annotations

import importlib

import click

from soundstage.stages import STAGE_MODULES

# name -> "module:attribute" of a click command defined elsewhere
TOOL_COMMANDS = {
    "manifest": "soundstage.manifests.cli:manifest",
    "run": "soundstage.pipeline.pipeline_file:run",
    "status": "soundstage.cache.cli:status",
    "verify": "soundstage.cache.cli:verify",
    "cache": "soundstage.cache.cli:cache",
    "tags": "soundstage.stages.tags:tags",
    "export": "soundstage.stages.export:export",
    "demo": "soundstage.demo:demo",
    "evaluate": "soundstage.evaluate:evaluate",
    "train": "soundstage.train.cli:train",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(TOOL_COMMANDS) | set(STAGE_MODULES))

    def get_command(self, ctx, name):
        if name in STAGE_MODULES:
            from soundstage.pipeline.cli import stage_command
            from soundstage.stages import get_stage

            return stage_command(get_stage(name))
        if name in TOOL_COMMANDS:
            module, attr = TOOL_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soundstage")
def main():
    """Resumable, cached preprocessing stages for audio-visual segmentation (AVS) research."""


if __name__ == "__main__":
    main()
