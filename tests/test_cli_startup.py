"""``soundstage --help`` and ``soundstage status`` start without importing the heavy libraries:
commands load lazily, and the command list reads each command's one-line help from its source."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from soundstage.cli import TOOL_COMMANDS, _short_help_from_source, first_sentence, main
from soundstage.stages import BUILTIN_STAGES

HEAVY = ("torch", "transformers", "pandas", "matplotlib", "scipy", "sklearn")


def _modules_loaded_by(args: list[str]) -> tuple[str, list[str]]:
    code = (
        "import json, sys\n"
        "from soundstage.cli import main\n"
        "try:\n"
        f"    main({args!r}, standalone_mode=False)\n"
        "finally:\n"
        "    print('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out, _, modules = result.stdout.rpartition("MODULES=")
    return out, json.loads(modules)


def test_help_lists_every_command_without_importing_them():
    out, modules = _modules_loaded_by(["--help"])
    for name in [*TOOL_COMMANDS, *BUILTIN_STAGES]:
        assert f"  {name} " in out, name
    heavy = sorted({m.split(".")[0] for m in modules} & set(HEAVY))
    assert not heavy, f"soundstage --help imported {heavy}"


def test_status_imports_no_model_library(tmp_path):
    _, modules = _modules_loaded_by(["status", "--cache", str(tmp_path)])
    assert not [m for m in modules if m.split(".")[0] in ("torch", "transformers", "matplotlib")]


def test_short_help_read_from_source_equals_the_commands_own():
    """The help read from the source is what the imported command says (for every built-in command)."""
    ctx = click.Context(main)
    for name in [*TOOL_COMMANDS, *BUILTIN_STAGES]:
        command = main.get_command(ctx, name)
        expected = first_sentence(command.short_help or command.help or "")
        assert _short_help_from_source(name) == expected, name
