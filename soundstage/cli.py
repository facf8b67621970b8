"""The ``soundstage`` command: one subcommand per stage, plus manifest/run/status/verify/cache/tags.

Subcommands are imported only when used, so ``soundstage --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import os

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
    "report": "soundstage.train.report:report",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(TOOL_COMMANDS) | set(STAGE_MODULES))

    def get_command(self, ctx, name):
        if name in STAGE_MODULES:
            from soundstage.pipeline.cli import stage_command
            from soundstage.pipeline.registry import get_stage

            return stage_command(get_stage(name))
        if name in TOOL_COMMANDS:
            module, attr = TOOL_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return None

    def invoke(self, ctx):
        """User mistakes are ``click.ClickException``s (one line, exit 1). Anything else is a bug:
        one line too, saying how to get the traceback (``--debug`` or SOUNDSTAGE_DEBUG=1)."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if debug_enabled():
                raise
            raise click.ClickException(
                f"{type(e).__name__}: {e} (unexpected: probably a bug in soundstage; rerun with --debug "
                "or SOUNDSTAGE_DEBUG=1 for the traceback)"
            ) from None


def debug_enabled() -> bool:
    return os.environ.get("SOUNDSTAGE_DEBUG", "") not in ("", "0")


def _set_debug(ctx, param, value):
    if value:  # the environment carries it into shard processes and SLURM jobs
        os.environ["SOUNDSTAGE_DEBUG"] = "1"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soundstage")
@click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="show the full traceback of an unexpected error (also: SOUNDSTAGE_DEBUG=1)",
)
def main():
    """Resumable, cached preprocessing stages for audio-visual segmentation (AVS) research."""


if __name__ == "__main__":
    main()
