"""Kaldi log-mel filterbank in plain torch, as BEATs uses it (no torchaudio).

Numerically follows ``torchaudio.compliance.kaldi.fbank`` with BEATs' call
(``num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10``) and the
torchaudio defaults that call inherits: dither 0, ``snip_edges`` framing, per-frame DC
removal, pre-emphasis 0.97 (first sample against itself), Povey window, FFT padded to a
power of two, power spectrum, 128 triangular filters on Kaldi's mel scale between 20 Hz and
Nyquist, ``log(max(energy, float32 eps))``, no energy column. Batched over the first axis:
every row of a batch has the same length, so framing is one ``unfold``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
FFT = 512  # WINDOW rounded up to a power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# BEATs scales float waveforms to the int16 range before the fbank (Kaldi convention)
WAVE_SCALE = 2**15
# BEATs' normalisation of the fbank: (x - mean) / (2 * std)
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
# torchaudio floors energies at the float32 machine epsilon before the log
_EPS = torch.finfo(torch.float32).eps


def num_frames(num_samples: int) -> int:
    """Frames a ``snip_edges`` framing yields for ``num_samples`` (0 if shorter than a window)."""
    return 0 if num_samples < WINDOW else 1 + (num_samples - WINDOW) // HOP


def _mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def mel_filterbank(num_bins: int = NUM_MEL_BINS, device: str = "cpu") -> torch.Tensor:
    """[num_bins, FFT // 2 + 1] triangular filters, computed in float32 as torchaudio does.

    Triangles are linear in mel: rising from the left edge to the centre, falling to the
    right edge; the Nyquist bin gets weight 0 (Kaldi uses only the first FFT // 2 bins).
    """
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + (SAMPLE_RATE / 2) / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + index * delta
    centre = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    mel = _mel((SAMPLE_RATE / FFT) * torch.arange(FFT // 2, dtype=torch.float32)).unsqueeze(0)
    rising = (mel - left) / (centre - left)
    falling = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).to(device)


@lru_cache(maxsize=8)
def povey_window(device: str = "cpu") -> torch.Tensor:
    return torch.hann_window(WINDOW, periodic=False, dtype=torch.float32).pow(0.85).to(device)


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log-mel energies ``[B, frames, num_mel_bins]`` of ``wave`` ``[B, samples]`` (already int16-scaled).

    Computed in float32 for half-precision input (energies of int16-range audio overflow
    fp16) and in float64 for float64 input.
    """
    if wave.dim() != 2:
        raise ValueError(f"expected [batch, samples], got shape {tuple(wave.shape)}")
    wave = wave if wave.dtype == torch.float64 else wave.float()
    batch, samples = wave.shape
    if samples < WINDOW:
        return wave.new_zeros(batch, 0, num_mel_bins)
    frames = wave.unfold(1, WINDOW, HOP)  # [B, F, WINDOW], snip_edges framing
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - PREEMPHASIS * previous
    frames = frames * povey_window(str(wave.device)).to(wave.dtype)
    spectrum = torch.fft.rfft(frames, n=FFT).abs().pow(2.0)  # zero-padded to FFT
    energies = spectrum @ mel_filterbank(num_mel_bins, str(wave.device)).to(wave.dtype).T
    return torch.clamp(energies, min=_EPS).log()


def beats_fbank(source: torch.Tensor, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> torch.Tensor:
    """BEATs' front end: float waveforms ``[B, samples]`` in [-1, 1] -> normalised fbank ``[B, frames, 128]``."""
    return (kaldi_fbank(source.float() * WAVE_SCALE) - mean) / (2 * std)
