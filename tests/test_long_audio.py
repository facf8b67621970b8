"""Long audio cannot take a run down: BEATs' clip probabilities over windows (bounded memory),
--max-seconds refusals recorded as failures, and a clip that kills the process (out of memory) is
run after what is finished is committed, then recorded as failed instead of killing every rerun."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from _wavs import make_wavs, write_manifest
from test_shutdown import CLI_SCRIPT, HERE

from soundstage.pipeline.runner import run_stage
from soundstage.stages import get_stage


@pytest.fixture(scope="module")
def tiny_beats(tmp_path_factory):
    from soundstage.models.tiny import build_beats
    from soundstage.stages.beats import STAGE

    path = build_beats(tmp_path_factory.mktemp("beats") / "beats_tiny.pt")
    return path, STAGE.setup({"checkpoint": path, "device": "cpu", "dtype": "fp32"})


def test_beats_clip_probs_of_long_audio_are_the_mean_over_equal_windows(tiny_beats):
    from soundstage.stages.beats import STAGE

    _, model = tiny_beats
    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(25 * 16000 + 7)).astype(np.float32)
    out = STAGE.process(model, [{"wave": wave, "seconds": 25}], {"clip_window": 10.0})[0]
    with torch.no_grad():  # independently: three windows of 25 s / 3 (sample counts differ by one at most)
        bounds = np.linspace(0, len(wave), 4).round().astype(int)
        windows = [wave[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        assert max(len(w) for w in windows) <= 10 * 16000
        expected = np.mean([model.extract_features(torch.from_numpy(w)[None])[0][0].numpy() for w in windows], axis=0)
        whole = model.extract_features(torch.from_numpy(wave)[None])[0][0].numpy()
    np.testing.assert_allclose(out["clip_probs"], expected, atol=1e-3)
    assert np.abs(expected - whole).max() > 1e-3  # the windows make a difference here
    # clip_window 0: one pass over the whole clip, as before
    single = STAGE.process(model, [{"wave": wave, "seconds": 25}], {"clip_window": 0.0})[0]
    np.testing.assert_allclose(single["clip_probs"], whole, atol=1e-3)
    # a clip no longer than the window is one pass either way
    short = wave[: 10 * 16000]
    with torch.no_grad():
        ref = model.extract_features(torch.from_numpy(short)[None])[0][0].numpy()
    np.testing.assert_allclose(STAGE.process(model, [{"wave": short, "seconds": 10}], {})[0]["clip_probs"], ref, atol=1e-3)


def test_max_seconds_refuses_long_clips_as_recorded_failures(tmp_path):
    rows = make_wavs(str(tmp_path), n=4, seconds=(1, 3))
    manifest = write_manifest(str(tmp_path), rows)
    summary = run_stage(get_stage("audio-stats"), manifest, str(tmp_path / "c"), {"max_seconds": 2.0}, progress=False)
    assert summary.done == 2
    assert sorted(cid for cid, _ in summary.failed) == [r["clip_id"] for r in rows if r["seconds"] == 3]
    assert all("3.0 s long, over --max-seconds 2" in cause for _, cause in summary.failed)
    unlimited = run_stage(get_stage("audio-stats"), manifest, str(tmp_path / "c"), {}, progress=False)
    assert unlimited.ok and unlimited.done == 2 and unlimited.cached == 2  # the limit is not in the key


def test_a_clip_that_kills_the_run_is_recorded_and_the_shard_finishes(tmp_path):
    from soundstage.cache import open_stage

    rows = make_wavs(str(tmp_path), n=6, seconds=(1,))
    long = tmp_path / "audio" / "long.wav"
    sf.write(long, np.zeros(2 * 16000, np.float32), 16000)
    rows.insert(3, {"clip_id": "long", "audio_path": os.path.relpath(long, tmp_path)})
    manifest = write_manifest(str(tmp_path), rows)
    cache, markers = tmp_path / "c", tmp_path / "markers"
    markers.mkdir()
    args = [
        "toy-fragile-long",
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--workers",
        0,
        "--no-progress",
        "--commit-every",
        1000,
        "--marker-dir",
        markers,
    ]
    script = CLI_SCRIPT.replace(
        'register_stage("toy-slow"',
        'register_stage("toy-fragile-long", "shutdown_stages:FRAGILE_ON_LONG")\nregister_stage("toy-slow"',
    )

    def run(*extra):
        code = script.format(tests=HERE, args=[str(a) for a in [*args, *extra]])
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    died = run("--die-on-long")
    assert died.returncode == -9  # killed, as by the OOM killer
    output = cache / "toy-fragile-long"
    (fingerprint,) = os.listdir(output)
    assert len(open_stage(str(output / fingerprint))) == 3  # the clips before it were committed first
    again = run("--die-on-long")  # would die again if it tried the clip
    assert again.returncode == 1, again.stderr
    assert "failed long: the run died while computing this clip" in again.stdout
    assert len(open_stage(str(output / fingerprint))) == 6
    third = run("--die-on-long")
    assert third.returncode == 1 and "already cached 6" in third.stdout and "failed long" in third.stdout
    tried = len(os.listdir(markers))
    forced = run("--force")  # given the memory now: tried again
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert len(open_stage(str(output / fingerprint))) == 7 and len(os.listdir(markers)) > tried
