"""The demo's model listens, at every seed.

On the synthetic data only the audio says which of the visible objects sound (and when nothing
does), so a model that uses it must score better with its real cue than with the cue of digital
silence (muted) or with another clip's cue (swapped). Here `soundstage demo` runs, unchanged, at
five seeds (each a different dataset and different random tiny models), and the model it trained
is scored on the test split — clips no choice was made on — as the demo's summary scores it:
real − muted ≥ 0.10 and real − swapped ≥ 0.05 mIoU at every seed (docs/training.md).

The slowest test of the suite: five whole demos, two at a time (about three minutes of
CPU each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from soundstage.demo import DEMO_RUN, score_test_split

SEEDS = (1, 2, 3, 4, 5)
MUTED_MARGIN, SWAPPED_MARGIN = 0.10, 0.05


def run_demo(out_dir: str, seed: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "soundstage.cli", "demo", "--out", out_dir, "--seed", str(seed)]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[int, tuple[str, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("listening")
    folders = {seed: str(root / f"seed{seed}") for seed in SEEDS}
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        done = dict(zip(SEEDS, pool.map(lambda seed: run_demo(folders[seed], seed), SEEDS)))
    return {seed: (folders[seed], done[seed]) for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_the_demo_model_listens(demos, seed):
    out_dir, result = demos[seed]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the summary prints real - swapped beside real - muted, for the test split too
    test_table = result.stdout.split("(test, best model, epoch")[1]
    assert "real-muted" in test_table and "real-swapped" in test_table
    scores = score_test_split(os.path.join(out_dir, "runs", DEMO_RUN))["eval"]
    real, muted, swapped = (scores[variant]["miou"] for variant in ("real", "muted", "swapped"))
    numbers = f"seed {seed}: test mIoU real {real:.3f}, muted {muted:.3f}, swapped {swapped:.3f}"
    assert real - muted >= MUTED_MARGIN, numbers
    assert real - swapped >= SWAPPED_MARGIN, numbers
    # what the demo printed is what its saved model scores
    printed = {line.split()[0]: float(line.split()[1]) for line in test_table.splitlines()[1:] if line.startswith("real-")}
    assert printed == pytest.approx({"real-muted": real - muted, "real-swapped": real - swapped}, abs=1e-4), test_table
