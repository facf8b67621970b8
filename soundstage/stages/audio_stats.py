"""audio-stats: original rate/channels/duration and per-second loudness of each clip.

Useful on its own to find silent or muted clips (e.g. before audio-bias studies). Loudness is
measured on the 16 kHz mono signal every audio stage sees. Second i covers samples
[16000 i, 16000 (i + 1)); a trailing partial second counts when it is at least half a second.
"""

import numpy as np

from soundstage.audio import TARGET_SR, load_audio, max_seconds_param
from soundstage.manifests.table import resolve_path
from soundstage.pipeline.stage import Field, Param, Stage

DB_FLOOR = -200.0  # the dB value of digital silence (RMS 0)


def per_second_rms_db(wave: np.ndarray, sr: int = TARGET_SR) -> np.ndarray:
    seconds = len(wave) // sr + (1 if len(wave) % sr >= sr // 2 else 0)
    out = np.empty(max(seconds, 1), dtype=np.float32)
    for i in range(len(out)):
        window = wave[i * sr : (i + 1) * sr].astype(np.float64)
        rms = np.sqrt(np.mean(window**2)) if window.size else 0.0
        out[i] = 20 * np.log10(rms) if rms > 10 ** (DB_FLOOR / 20) else DB_FLOOR
    return out


def load(row, ctx):
    audio = load_audio(resolve_path(row["audio_path"], ctx.manifest_dir), max_seconds=ctx.params.get("max_seconds"))
    rms_db = per_second_rms_db(audio.wave)
    return {
        "sample_rate": audio.orig_sample_rate,
        "channels": audio.orig_channels,
        "duration": audio.orig_frames / audio.orig_sample_rate,
        "rms_db": rms_db,
        "silent": rms_db < ctx.params["silence_db"],
    }


STAGE = Stage(
    name="audio-stats",
    reads=("audio_path",),  # manifest columns load uses (their files are digested too)
    required_columns=("audio_path",),
    version=1,
    help="Sample rate, channels, duration, per-second RMS (dB) and silence flags of each clip.",
    params=[
        Param("silence_db", float, -60.0, "a second quieter than this (dB RMS, full scale = 0) is silent"),
        max_seconds_param(),
    ],
    fields=[
        Field("sample_rate", "int32", (), "original sample rate (Hz)"),
        Field("channels", "int32", (), "original channel count"),
        Field("duration", "float32", (), "original duration (s)"),
        Field("rms_db", "float32", (None,), "RMS per second at 16 kHz mono (dB full scale)"),
        Field("silent", "bool", (None,), "rms_db < silence_db per second"),
    ],
    load=load,  # all the work is decoding, done in the workers; what load returns is stored
    default_batch_size=64,
)
