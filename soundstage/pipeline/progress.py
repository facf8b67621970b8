"""The progress bar every long loop shows: on stderr, redrawn twice a second on a terminal and
every 30 s otherwise, so a SLURM job's log gets a line now and then, not thousands."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "clip"):
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )
