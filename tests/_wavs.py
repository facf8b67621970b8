"""Small generated audio sets for the engine tests (independent of the synthetic dataset)."""

import os

import numpy as np
import pandas as pd
import soundfile as sf

RATES = [(16000, 1), (44100, 2), (48000, 1)]


def tone(sr, seconds, freq, amp):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_wavs(root, n=12, start=0, seconds=(5, 10)):
    """Write n tone wavs (mixed rates/layouts, known amplitude) and return manifest rows."""
    os.makedirs(os.path.join(root, "audio"), exist_ok=True)
    rows = []
    for i in range(start, start + n):
        sr, ch = RATES[i % len(RATES)]
        sec = seconds[i % len(seconds)]
        amp = 0.05 + 0.05 * (i % 7)
        x = tone(sr, sec, 220 + 40 * i, amp)
        if ch == 2:
            x = np.stack([x, x], axis=1)
        path = os.path.join("audio", f"clip{i:03d}.wav")
        sf.write(os.path.join(root, path), x, sr)
        rows.append({"clip_id": f"clip{i:03d}", "audio_path": path, "amp": amp, "sr": sr, "channels": ch, "seconds": sec})
    return rows


def write_manifest(root, rows, name="manifest.csv"):
    path = os.path.join(root, name)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
