"""The inputs of the stored VGGish reference embeddings (``vggish_reference.npz``): full-size
random weights in the torchvggish layout and three 16-bit WAV files, all generated from seeds.

Pure numpy + soundfile, so the script that ran the reference code (``make_vggish_reference.py``,
run outside the project against harritaylor/torchvggish and towhee's ``torch_vggish.py``) and the
tests build exactly the same inputs.
"""

import numpy as np
import soundfile as sf

#: (sample rate, channels) of the three files: the reference's 16 kHz, and two rates it resamples
FILES = ((16000, 1), (44100, 2), (48000, 1))
SECONDS = 3.0

#: the torchvggish state-dict layout, in order: (key, shape)
CONVS = ((0, 1, 64), (3, 64, 128), (6, 128, 256), (8, 256, 256), (11, 256, 512), (13, 512, 512))
LINEARS = ((0, 12288, 4096), (2, 4096, 4096), (4, 4096, 128))


def full_size_weights(seed: int = 0) -> dict:
    """``{key: float32 array}``: He-scaled normal weights (activations stay O(1) through the 9
    layers, so the embeddings are not dominated by rounding), small normal biases."""
    rng = np.random.default_rng(seed)
    state = {}
    for i, cin, cout in CONVS:
        state[f"features.{i}.weight"] = rng.standard_normal((cout, cin, 3, 3), np.float32) * np.float32(np.sqrt(2 / (9 * cin)))
        state[f"features.{i}.bias"] = rng.standard_normal(cout, np.float32) * np.float32(0.05)
    for i, fan_in, fan_out in LINEARS:
        state[f"embeddings.{i}.weight"] = rng.standard_normal((fan_out, fan_in), np.float32) * np.float32(np.sqrt(2 / fan_in))
        state[f"embeddings.{i}.bias"] = rng.standard_normal(fan_out, np.float32) * np.float32(0.05)
    return state


def file_name(sample_rate: int, channels: int) -> str:
    return f"sr{sample_rate}_ch{channels}.wav"


def write_file(folder, sample_rate: int, channels: int) -> str:
    """A 3 s PCM_16 WAV: a chirp plus noise per channel (the channels differ, so the channel
    mean matters)."""
    rng = np.random.default_rng(sample_rate + channels)
    t = np.arange(int(SECONDS * sample_rate)) / sample_rate
    columns = []
    for c in range(channels):
        f0 = 200.0 * (c + 1)
        chirp = np.sin(2 * np.pi * (f0 * t + 300.0 * t**2))
        columns.append(0.3 * chirp + 0.05 * rng.standard_normal(len(t)))
    path = f"{folder}/{file_name(sample_rate, channels)}"
    sf.write(path, np.stack(columns, axis=1), sample_rate, subtype="PCM_16")
    return path
