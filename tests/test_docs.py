"""The documentation cannot rot: the Getting-started tour is run command by command, and the site builds."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from soundstage.stages import BUILTIN_STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GETTING_STARTED = os.path.join(REPO, "docs", "getting-started.md")
MARKER = "<!-- tested:"


def commands_in_tested_blocks(markdown: str) -> list[str]:
    """The lines of every fenced block that follows a ``<!-- tested: ... -->`` marker."""
    commands = []
    for block in re.findall(re.escape(MARKER) + r"[^\n]*-->\n```bash\n(.*?)\n```", markdown, flags=re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands


def test_tested_commands_are_found():
    with open(GETTING_STARTED, encoding="utf-8") as f:
        commands = commands_in_tested_blocks(f.read())
    assert commands and commands[0].startswith("soundstage demo"), commands


def test_getting_started_tour_runs(tmp_path):
    with open(GETTING_STARTED, encoding="utf-8") as f:
        commands = commands_in_tested_blocks(f.read())
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "soundstage", f"the tour runs soundstage commands only: {command}"
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"{command!r} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    assert (tmp_path / "tour" / "report" / "index.html").is_file()
    assert len(list((tmp_path / "tour" / "vggish").glob("*.npy"))) == 12


def test_docs_site_builds_strictly(tmp_path):
    mkdocs = pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    del mkdocs
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_stage_has_its_option_table_in_the_stages_page():
    """docs/hooks/stage_options.py turns ``<!-- stage-options: NAME -->`` into the stage's options;
    a stage without the marker would be missing from the Stages page."""
    with open(os.path.join(REPO, "docs", "stages.md"), encoding="utf-8") as f:
        documented = set(re.findall(r"<!-- stage-options: ([\w-]+) -->", f.read()))
    assert set(BUILTIN_STAGES) <= documented, sorted(set(BUILTIN_STAGES) - documented)
