"""Peak memory of each audio stage against clip length.

    python benchmarks/bench_memory.py [--seconds 10,60,300,600] [--one-pass 10,30,60,120]

Every (stage, length) runs in a fresh process: it builds the stage's model (the tiny stand-ins of
``soundstage demo``, saved and loaded through the real loading code), then decodes one clip of
that length with the stage's own ``load`` and runs its ``process``, as the runner does. Reported:
the peak resident memory of that process while it handles the clip, above what was resident
once the model was loaded (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
after loading; decoded audio, features and activations).

``beats (one pass)`` is the stage with ``clip_window: 0`` (what it did before windows), over
shorter lengths only: its attention grows with the square of the length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from soundstage.pipeline.fingerprint import normalise_params
from soundstage.pipeline.stage import LoadContext
from soundstage.stages import get_stage

name, wav, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
stage = get_stage(name)
params = normalise_params(stage, params)
model = stage.setup(params) if stage.setup else None


def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to what is resident now
    f.write("5")
before = status_mb("VmRSS")
start = time.monotonic()
item = stage.load({"clip_id": "x", "audio_path": wav}, LoadContext(params=params, upstream={}, manifest_dir="/"))
if stage.process is not None:
    stage.process(model, [item], params)
print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM"), "seconds": time.monotonic() - start}))
"""


def measure(stage: str, wav: str, params: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, stage, wav, json.dumps(params)], capture_output=True, text=True, timeout=3600
    )
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="10,60,300,600")
    parser.add_argument("--one-pass", default="10,30,60,120", help="lengths for beats with clip_window 0")
    args = parser.parse_args()
    from soundstage.models.tiny import build_tiny_models

    lengths = [int(s) for s in args.seconds.split(",")]
    one_pass = [int(s) for s in args.one_pass.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = build_tiny_models(os.path.join(tmp, "models"), names=["hubert", "beats", "vggish"])
        rng = np.random.default_rng(0)
        wavs = {}
        for seconds in sorted(set(lengths) | set(one_pass)):
            t = np.arange(seconds * 16000) / 16000
            wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
            wavs[seconds] = os.path.join(tmp, f"{seconds}s.wav")
            sf.write(wavs[seconds], wave.astype(np.float32), 16000, subtype="PCM_16")
        runs = [
            ("audio-stats", {}, lengths),
            ("hubert", {"model": models["hubert"], "layer": 2, "device": "cpu"}, lengths),
            ("vggish", {"checkpoint": models["vggish"], "device": "cpu"}, lengths),
            ("beats", {"checkpoint": models["beats"], "device": "cpu"}, lengths),
            ("beats (one pass)", {"checkpoint": models["beats"], "device": "cpu", "clip_window": 0.0}, one_pass),
        ]
        print("peak resident memory while one clip is handled, above the loaded model (MB); tiny models, 1 thread")
        print(f"{'stage':<18}{'clip s':>8}{'peak MB':>10}{'MB per min':>12}{'time s':>9}")
        for label, params, seconds_list in runs:
            for seconds in seconds_list:
                r = measure(label.split(" ")[0], wavs[seconds], params)
                if "error" in r:
                    print(f"{label:<18}{seconds:>8}  failed: {r['error']}")
                    continue
                extra = r["peak_mb"] - r["before_mb"]
                print(f"{label:<18}{seconds:>8}{extra:>10.0f}{extra / (seconds / 60):>12.1f}{r['seconds']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
