"""mkdocs hook: ``<!-- stage-options: NAME -->`` in a page becomes the table of that stage's own
options, generated from its declaration (the same one its command line is built from), so the
documented options, defaults and cache-key membership cannot drift from the code."""

from __future__ import annotations

import re

from soundstage.pipeline.cli import stage_command
from soundstage.pipeline.registry import get_stage

MARKER = re.compile(r"<!-- stage-options: ([\w-]+) -->")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def options_table(name: str) -> str:
    stage = get_stage(name)
    command = stage_command(stage)
    declared = {p.name: p for p in stage.params}
    rows = ["| option | default | in the cache key | meaning |", "| --- | --- | --- | --- |"]
    for option in command.params:
        upstream = option.name.startswith("upstream__")
        if option.name not in declared and not upstream:
            continue  # the runner's and executors' options, the same for every stage (Concepts)
        param = declared.get(option.name)
        flags = " / ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
        default = "" if option.default in (None, "", ()) else f"`{option.default}`"
        key = "selects the input" if upstream else ("yes" if param.fingerprint else "no")
        choices = f" (one of: {', '.join(param.choices)})" if param is not None and param.choices else ""
        rows.append(f"| {flags} | {_cell(default)} | {key} | {_cell(option.help or '')}{_cell(choices)} |")
    return f"Options of `soundstage {name}` (besides the runner options every stage takes):\n\n" + "\n".join(rows) + "\n"


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: options_table(m.group(1)), markdown)
