"""Start-up of the command line: ``soundstage --help`` and ``soundstage status``.

    python benchmarks/bench_startup.py [--repeats 7]

Each command runs as a fresh process (what a user waits for), best of ``--repeats``, interleaved
with its alternative so that machine load hits both alike:

- ``soundstage --help`` as shipped (every command's one-line help read from its module's source)
  vs listing the commands the way click does by default (importing every command to ask it for
  its help, which imports torch and transformers through the stage modules);
- ``soundstage status`` on an empty cache (only the cache package is imported) vs a bare
  ``python -c pass`` (the interpreter's own start-up, the floor).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

IMPORT_EVERY_COMMAND = (
    "import click\n"
    "from soundstage.cli import main\n"
    "ctx = click.Context(main)\n"
    "for name in main.list_commands(ctx):\n"
    "    main.get_command(ctx, name).get_short_help_str()\n"
)


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    soundstage = os.path.join(os.path.dirname(sys.executable), "soundstage")  # the installed console script
    with tempfile.TemporaryDirectory() as cache:
        pairs = {
            "soundstage --help": (
                [soundstage, "--help"],
                [sys.executable, "-c", IMPORT_EVERY_COMMAND],
                "importing every command",
            ),
            "soundstage status (empty cache)": (
                [soundstage, "status", "--cache", cache],
                [sys.executable, "-c", "pass"],
                "python -c pass",
            ),
        }
        for name, (ours, other, other_name) in pairs.items():
            best_ours = best_other = float("inf")
            for _ in range(args.repeats):
                best_ours = min(best_ours, seconds(ours))
                best_other = min(best_other, seconds(other))
            print(f"{name}: {best_ours:.2f} s; {other_name}: {best_other:.2f} s; ratio {best_other / best_ours:.1f}x")


if __name__ == "__main__":
    main()
