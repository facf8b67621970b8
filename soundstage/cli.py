"""The ``soundstage`` command: one subcommand per stage, plus manifest/run/status/verify/cache/tags.

Subcommands are imported only when used, so ``soundstage status`` imports the cache and nothing
else. ``soundstage --help`` lists every command's one-line help read from its module's source
(the stage's ``help=`` or the command's docstring), so listing them imports none of them (they
import torch); a command whose help cannot be read that way is imported after all.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import sys

import click

from soundstage.pipeline.cli import stage_command
from soundstage.pipeline.registry import get_stage
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
    "runs": "soundstage.train.runs:runs",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(TOOL_COMMANDS) | set(STAGE_MODULES))

    def get_command(self, ctx, name):
        if name in STAGE_MODULES:
            return stage_command(get_stage(name))
        if name in TOOL_COMMANDS:
            module, attr = TOOL_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return None

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            short = _short_help_from_source(name)
            if short is None:
                command = self.get_command(ctx, name)
                short = command.get_short_help_str(formatter.width) if command is not None else ""
            rows.append((name, short))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


def _short_help_from_source(name: str) -> str | None:
    """The one-line help of command ``name`` as its module's source states it, or None."""
    target = STAGE_MODULES.get(name) or TOOL_COMMANDS.get(name)
    module, _, attr = target.partition(":")
    attr = attr.strip() or "STAGE"
    try:
        with open(_source_path(module.strip()), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            text = ast.get_docstring(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            keywords = {k.arg: k.value for k in getattr(node.value, "keywords", ())}
            text = keywords["help"].value if isinstance(keywords.get("help"), ast.Constant) else None
            text = text.split(". ")[0] if text else None  # as stage_command's short_help
        else:
            continue
        return first_sentence(text) if text else None
    return None


def first_sentence(text: str) -> str:
    """The first sentence of a help text's first paragraph, on one line (a command's short help)."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    head, dot, _ = paragraph.partition(". ")
    return head + "." if dot else paragraph


def _source_path(module: str) -> str:
    """The file of ``module``, found without importing its parent packages (``importlib.util.find_spec``
    would run them: ``soundstage.manifests`` imports pandas)."""
    top, *parts = module.split(".")
    spec = importlib.util.find_spec(top)
    for part in parts:
        spec = importlib.machinery.PathFinder.find_spec(part, spec.submodule_search_locations)
    return spec.origin


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
    print_file_names_as_they_are()


def print_file_names_as_they_are() -> None:
    """A file name that is not UTF-8 (its bytes held as surrogates) is written back as those bytes,
    as ``ls`` shows it, instead of failing the print under a strict UTF-8 locale."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


if __name__ == "__main__":
    main()
