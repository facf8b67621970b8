"""Decoding and resampling audio: the one helper every audio stage uses.

soundfile decodes (wav, flac, ogg, ...); scipy's polyphase filter resamples (no torchaudio), or
resampy's ``kaiser_best`` filter where a reference model's preprocessing used it (VGGish).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from soundstage.pipeline.stage import ClipError, Param

TARGET_SR = 16000


@dataclass
class Audio:
    wave: np.ndarray  # float32 [samples], mono, in [-1, 1], at ``sample_rate``
    sample_rate: int
    orig_sample_rate: int
    orig_channels: int
    orig_frames: int


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited polyphase resampling along the last axis (Kaiser-windowed FIR)."""
    if orig_sr == target_sr:
        return wave

    ratio = Fraction(target_sr, orig_sr)
    out = resample_poly(wave.astype(np.float64), ratio.numerator, ratio.denominator, axis=-1)
    return out.astype(np.float32)


def resample_kaiser_best(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``resampy.resample(wave, orig_sr, target_sr)`` with its default ``kaiser_best`` filter, in
    float64 (torchvggish's ``waveform_to_examples``, which towhee's VGGish operator calls too)."""
    if orig_sr == target_sr:
        return wave
    import resampy  # why here: it loads numba, and only non-16 kHz VGGish input needs it

    return resampy.resample(np.asarray(wave, np.float64), orig_sr, target_sr, axis=-1)


def max_seconds_param(default: float | None = None):
    """The ``--max-seconds`` parameter of an audio stage (not in the fingerprint: it decides which
    clips are tried, not their values)."""
    return Param(
        "max_seconds",
        float,
        default,
        "refuse clips longer than this many seconds, before decoding: "
        "each is recorded as failed (cause: its length), so one huge clip cannot take the run down "
        "(memory per clip grows with its length; see the docs, Benchmarks). Empty or 0: no limit",
        fingerprint=False,
    )


def soundfile_name(path: str):
    """``path`` as soundfile should get it: the file system's bytes on POSIX, since soundfile
    encodes a str as UTF-8, which a name in another encoding (its bytes held as surrogates) is not."""
    return os.fsencode(path) if os.name == "posix" else path


def load_audio(path: str, target_sr: int = TARGET_SR, max_seconds: float | None = None, resampler=resample) -> Audio:
    """Read ``path``, average channels to mono and resample to ``target_sr`` with ``resampler``
    (``resample`` or ``resample_kaiser_best``).

    Raises ``ClipError`` with a short cause for a missing, unreadable or empty file, or one longer
    than ``max_seconds`` (read from its header, before decoding), so the runner records the clip
    as failed instead of substituting anything.
    """
    if not os.path.exists(path):
        raise ClipError(f"missing audio {path}")
    if os.path.getsize(path) == 0:
        raise ClipError(f"zero-byte audio {path}")
    name = soundfile_name(path)
    try:
        seconds = sf.info(name).duration if max_seconds else 0.0
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError for corrupt files
        raise ClipError(f"unreadable audio {path}: {e}") from None
    if max_seconds and seconds > max_seconds:
        raise ClipError(f"audio {path} is {seconds:.1f} s long, over --max-seconds {max_seconds:g}")
    try:
        data, sr = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError for corrupt files
        raise ClipError(f"unreadable audio {path}: {e}") from None
    if data.shape[0] == 0:
        raise ClipError(f"empty audio {path} (0 samples)")
    if not np.isfinite(data).all():
        raise ClipError(f"audio {path} contains NaN or Inf samples")
    mono = data.mean(axis=1)
    return Audio(
        wave=np.ascontiguousarray(resampler(mono, sr, target_sr), dtype=np.float32),
        sample_rate=target_sr,
        orig_sample_rate=int(sr),
        orig_channels=int(data.shape[1]),
        orig_frames=int(data.shape[0]),
    )
