"""A stage from another package: examples/plugin-stage, installed from a temporary copy, runs
through the CLI with resume and shows up in ``soundstage status`` — the registry knows it only
through its entry point."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(__file__))
from _wavs import make_wavs, write_manifest  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "plugin-stage")


def test_out_of_tree_stage_installs_runs_resumes_and_is_listed(tmp_path):
    package = tmp_path / "package"
    shutil.copytree(EXAMPLE, package)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def soundstage(*args):
        proc = subprocess.run([sys.executable, "-m", "soundstage.cli", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert re.search(r"^\s+peak-level\s", soundstage("--help"), re.MULTILINE)
    root = tmp_path / "data"
    rows = make_wavs(str(root), n=6)
    manifest = write_manifest(str(root), rows)
    cache = str(tmp_path / "cache")
    common = ["--manifest", manifest, "--cache", cache, "--workers", "0", "--no-progress"]

    first = soundstage("peak-level", *common, "--shard", "0/2")
    done_first = int(re.search(r"done (\d+)", first).group(1))
    assert 0 < done_first < len(rows)
    resumed = soundstage("peak-level", *common)  # only what shard 0 left
    assert f"done {len(rows) - done_first}, already cached {done_first}," in resumed

    status = soundstage("status", "--cache", cache)
    assert re.search(r"^peak-level\s+\w{16}\s+done\s+6\s+failed\s+0", status, re.MULTILINE), status

    # the stored values against a computation that shares nothing with the plugin
    from soundstage.cache.reader import open_stage
    from soundstage.cache.store import iter_stage_dirs

    (output,) = iter_stage_dirs(cache, "peak-level")
    reader = open_stage(output.path)
    for r in rows:
        wave, _ = sf.read(os.path.join(root, r["audio_path"]), dtype="float64", always_2d=True)
        expected_db = 20 * np.log10(np.abs(wave.mean(axis=1)).max())
        got = reader[r["clip_id"]]
        assert abs(float(got["peak_db"].max()) - expected_db) < 0.2
        assert len(got["peak_db"]) == r["seconds"] and not got["clipped"]
