"""The progress bar every long loop shows, on stderr: on a terminal a bar redrawn twice a second;
otherwise (a SLURM log, ``2> file``) one plain line every ``SOUNDSTAGE_PROGRESS_SECONDS``
seconds (default 30), so a log gets a line now and then, never thousands of carriage-return
redraws."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

DEFAULT_LINE_SECONDS = 30.0


class Lines:
    """A file for tqdm that turns each redraw (``"\\r" + bar + padding``) into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def line_seconds() -> float:
    value = os.environ.get("SOUNDSTAGE_PROGRESS_SECONDS", "")
    try:
        return float(value) if value else DEFAULT_LINE_SECONDS
    except ValueError:
        return DEFAULT_LINE_SECONDS


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "clip", initial: int = 0, stream=None):
    stream = stream or sys.stderr
    terminal = stream.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=terminal,
        ncols=None if terminal else 100,
        mininterval=0.5 if terminal else line_seconds(),
        maxinterval=max(10.0, line_seconds()),
        file=stream if terminal else Lines(stream),
    )
