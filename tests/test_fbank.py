"""The torch Kaldi fbank against two independent implementations.

kaldi-native-fbank (C++ port of Kaldi's compute-fbank-feats, a test-only dependency) and
transformers' numpy ``audio_utils.spectrogram`` in Kaldi mode (float64).

BEATs' setting (128 mel bins over a 512-point FFT from 20 Hz) leaves filter 3 without any FFT
bin: no bin centre falls strictly inside its mel triangle, so its energy is 0 and its log floors
at log(eps). Kaldi itself refuses such a filterbank ("You may have set num_mel_bins too large");
kaldi-native-fbank up to 1.22 compiled that check out of its release wheels and accepted it, and
1.23 made it an unconditional error. The kaldi-native-fbank comparisons therefore run at
filterbank sizes every version accepts (80 and 120 bins, the same code path as 128), and at 128
only where the installed version still accepts it; the 128-bin filterbank itself is checked
against transformers, which builds the same (empty) filter.
"""

import warnings

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch

from soundstage.models.fbank import (
    FBANK_MEAN,
    FBANK_STD,
    beats_fbank,
    kaldi_fbank,
    mel_filterbank,
    num_frames,
)

# float32 log energies (range about -16..30) agree to 1e-3 ...
TOL = 1e-3
# ... where float32 can resolve them at all: an FFT's rounding error is about eps x the frame's
# norm, so bins more than ~8 decades of energy below the frame's peak are rounding noise in any
# float32 implementation (torchaudio's included).
RESOLVABLE = np.log(1e8)


def assert_close_where_resolvable(ours, ref, atol=TOL):
    assert ours.shape == ref.shape
    resolvable = ref >= ref.max(axis=1, keepdims=True) - RESOLVABLE
    assert resolvable.mean() > 0.8  # the signals are built so that nearly all bins count
    np.testing.assert_allclose(ours[resolvable], ref[resolvable], atol=atol, rtol=0)


# filterbank sizes where every filter covers at least one FFT bin: all versions accept them
KNF_BINS = (80, 120)


def knf_fbank(wave: np.ndarray, num_bins: int = 80) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.snip_edges = True
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0
    opts.use_energy = False
    opts.use_power = True
    opts.use_log_fbank = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, wave.astype(np.float64).tolist())
    online.input_finished()
    frames = [online.get_frame(i) for i in range(online.num_frames_ready)]
    return np.stack(frames) if frames else np.zeros((0, num_bins), np.float32)


def signal(kind: str, samples: int, seed: int = 0) -> np.ndarray:
    """int16-range test signals."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    if kind == "tone+noise":
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(samples)
    elif kind == "chirp+dc":  # with a noise floor: float32 cannot resolve bins 1e-12 below the peak
        x = 0.5 * np.sin(2 * np.pi * (100 + 3000 * t) * t) + 0.2 + 1e-2 * rng.standard_normal(samples)
    elif kind == "clicks":
        x = np.zeros(samples)
        x[::997] = 0.9
    else:
        raise ValueError(kind)
    return (x * 32768).astype(np.float32)


@pytest.mark.parametrize("kind", ["tone+noise", "chirp+dc", "clicks"])
@pytest.mark.parametrize("samples", [400, 561, 16000 + 123])
@pytest.mark.parametrize("num_bins", KNF_BINS)
def test_equals_kaldi_native_fbank(kind, samples, num_bins):
    wave = signal(kind, samples)
    ours = kaldi_fbank(torch.from_numpy(wave)[None], num_mel_bins=num_bins)[0].numpy()
    ref = knf_fbank(wave, num_bins)
    assert ours.shape == ref.shape == (num_frames(samples), num_bins)
    assert_close_where_resolvable(ours, ref)


def test_beats_filterbank_has_one_empty_filter():
    """Why kaldi-native-fbank >= 1.23 refuses BEATs' setting (see the module docstring)."""
    covered = (mel_filterbank(128) > 0).sum(dim=1)
    assert covered.eq(0).nonzero().flatten().tolist() == [3]
    assert all((mel_filterbank(n) > 0).sum(dim=1).min() > 0 for n in KNF_BINS)


def test_equals_kaldi_native_fbank_at_128_bins_where_accepted():
    wave = signal("tone+noise", 16000 + 123)
    try:
        ref = knf_fbank(wave, 128)
    except ValueError as e:  # kaldi-native-fbank >= 1.23
        assert "num_mel_bins too large" in str(e)
        pytest.skip("this kaldi-native-fbank refuses a filterbank with an empty filter")
    ours = kaldi_fbank(torch.from_numpy(wave)[None])[0].numpy()
    assert_close_where_resolvable(ours, ref)


def test_silence_floors_at_float32_eps():
    ours = kaldi_fbank(torch.zeros(1, 1000), num_mel_bins=80)
    np.testing.assert_allclose(ours[0].numpy(), knf_fbank(np.zeros(1000, np.float32), 80), atol=1e-6)
    ours = kaldi_fbank(torch.zeros(1, 1000))
    assert torch.allclose(ours, torch.full_like(ours, np.log(np.finfo(np.float32).eps)))


def test_shorter_than_a_window_gives_no_frames():
    assert num_frames(399) == 0 and num_frames(400) == 1 and num_frames(560) == 2
    assert kaldi_fbank(torch.zeros(2, 399)).shape == (2, 0, 128)


def transformers_filters() -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    with warnings.catch_warnings():  # 128 filters over 256 bins leave one filter empty
        warnings.simplefilter("ignore")
        return mel_filter_bank(
            num_frequency_bins=257,
            num_mel_filters=128,
            min_frequency=20,
            max_frequency=8000,
            sampling_rate=16000,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )


def transformers_fbank(wave: np.ndarray) -> np.ndarray:
    """BEATs' 128-bin Kaldi fbank of int16-range ``wave``, computed in float64 by transformers."""
    from transformers.audio_utils import spectrogram, window_function

    return spectrogram(
        wave.astype(np.float64),
        window_function(400, "povey", periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=transformers_filters(),
        log_mel="log",
        mel_floor=float(np.finfo(np.float32).eps),
        remove_dc_offset=True,
    ).T


def test_equals_transformers_audio_utils_in_kaldi_mode():
    np.testing.assert_allclose(mel_filterbank().numpy(), transformers_filters().T, atol=1e-4)
    wave = signal("tone+noise", 16000 * 2 + 77, seed=3)
    ref = transformers_fbank(wave)
    # float64 input is computed in float64 (with float32 filters, as torchaudio): agreement to
    # the rounding of the filter weights
    ours64 = kaldi_fbank(torch.from_numpy(wave.astype(np.float64))[None])[0].numpy()
    np.testing.assert_allclose(ours64, ref, atol=5e-4, rtol=0)
    ours = kaldi_fbank(torch.from_numpy(wave)[None])[0].numpy()
    assert_close_where_resolvable(ours, ref)


def test_batched_rows_equal_single_rows():
    waves = np.stack([signal("tone+noise", 5000, seed=s) for s in range(3)])
    batched = kaldi_fbank(torch.from_numpy(waves))
    for i, w in enumerate(waves):
        torch.testing.assert_close(batched[i], kaldi_fbank(torch.from_numpy(w)[None])[0], atol=1e-5, rtol=0)


def test_beats_normalisation_of_float_waveforms():
    wave = signal("chirp+dc", 3000)
    ours = beats_fbank(torch.from_numpy(wave / 32768)[None])[0].numpy()
    ref = transformers_fbank(wave)
    assert_close_where_resolvable(ours * (2 * FBANK_STD) + FBANK_MEAN, ref)
    # the normalisation itself, exactly
    raw = kaldi_fbank(torch.from_numpy(wave)[None])[0].numpy()
    np.testing.assert_allclose(ours, (raw - 15.41663) / (2 * 6.55582), atol=1e-6)
