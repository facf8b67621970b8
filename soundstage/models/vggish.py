"""VGGish: the AudioSet log-mel front end, the network in the ``torchvggish`` state-dict layout
(two variants), and the AudioSet PCA + 8-bit post-processing.

Everything follows the reference that AVSBench ships (harritaylor/torchvggish, a port of the
TensorFlow AudioSet release ``research/audioset/vggish``), so the released weights
``vggish-10086976.pth`` and ``vggish_pca_params-970ea276.pth`` load as they are:

Front end (``log_mel``, ``examples``), at 16 kHz mono:

- a wav file holding 16-bit integers is read as ``int16 / 32768`` (soundfile's float reading of
  PCM_16 is exactly that, so ``soundstage.audio.load_audio`` gives the same samples);
- frames of 400 samples (25 ms) every 160 samples (10 ms), only whole frames
  (``1 + (n - 400) // 160``); each multiplied by the *periodic* Hann window
  ``0.5 - 0.5 cos(2 pi k / 400)``, zero-padded to an FFT of 512, magnitude of the 257 bins;
- 64 triangular mel bands on the HTK scale ``mel = 1127 ln(1 + f / 700)``, edges equally spaced
  in mel from 125 Hz to 7500 Hz, each bin weighted by ``max(0, min(rising, falling))`` of the
  band's triangle at the bin's frequency ``linspace(0, 8000, 257)``, the DC bin weighted 0;
- ``log(mel + 0.01)``; computed in float64 as the reference does, then float32;
- examples of 96 frames x 64 bands every 96 frames (0.96 s), an incomplete remainder dropped:
  ``1 + (frames - 96) // 96`` examples (5.0 s -> 5, 4.8 s -> 4, 10 s -> 10; at least 15,600
  samples, 0.975 s, for one).

Other rates: channel mean, then ``resampy.resample(x, sr, 16000)`` with its default
``kaiser_best`` filter, as the reference's ``waveform_to_examples`` does (the vggish stage loads
audio through ``soundstage.audio.load_audio(..., resampler=resample_kaiser_best)``).

Network (``VGGish``): input ``[N, 1, 96, 64]``; ``features`` = conv3x3(pad 1)+ReLU blocks with
2x2 max pools, ``[64, M, 128, M, 256, 256, M, 512, 512, M]`` (state-dict indices 0, 3, 6, 8,
11, 13); the ``[N, 512, 6, 4]`` map is flattened in (time, frequency, channel) order (the
TensorFlow layout); ``embeddings`` = Linear(12288, 4096)+ReLU, Linear(4096, 4096)+ReLU,
Linear(4096, 128)+ReLU (indices 0, 2, 4), so the raw embeddings are >= 0. The widths are read
from the state dict, so narrower stand-ins with the same layout load through the same code.

Variants (``VARIANTS``), the same weights and keys:

- ``torchvggish``: as above (harritaylor/torchvggish, which AVSBench ships);
- ``towhee``: towhee's ``models/vggish/torch_vggish.py``, behind ``ops.audio_embedding.vggish()``
  (what Stepping Stones, SegPref, GAVS and bias_in_AVS computed their features with), which
  leaves the last ReLU out: signed embeddings, equal to torchvggish's before its last ReLU. Its
  operator feeds the network the same examples as torchvggish's ``wavfile_to_examples`` for
  16-bit WAV: ffmpeg decodes int16 samples, divided by 32768, channel mean, resampy, the
  torchvggish front end. towhee applies no PCA.

PCA params (``load_pca_params``): ``{"pca_eigen_vectors": [128, 128], "pca_means": [128]}``
(the released file holds numpy arrays; ``pca_means`` may be ``[128, 1]``). Post-processing
(``postprocess``): ``E (x - m)``, clipped to [-2, 2], mapped to 0..255 by ``round((v + 2) *
255 / 4)``, in float32 — torchvggish's rule; the TensorFlow original truncates
(``astype(uint8)``) instead, which can differ by one quantisation level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from soundstage.models.safe_pickle import load_tensors, numpy_multiarray

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT = 512
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s
EXAMPLE_HOP = 96
EMBEDDING_SIZE = 128
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0

#: the conv stack of VGGish: channel counts, "M" = 2x2 max pool (each conv is followed by a ReLU)
REFERENCE_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
REFERENCE_HIDDEN = 4096

#: network variants: torchvggish (final ReLU, AVSBench) and towhee (no final ReLU; the other seeds)
VARIANTS = ("torchvggish", "towhee")

#: fewest samples that give one example: 96 frames
MIN_SAMPLES = WINDOW + (EXAMPLE_FRAMES - 1) * HOP


# ----------------------------------------------------------------------------- front end


def frame_count(num_samples: int) -> int:
    return 1 + (num_samples - WINDOW) // HOP if num_samples >= WINDOW else 0


def example_count(num_samples: int) -> int:
    """How many 96x64 examples the front end gives for ``num_samples`` samples at 16 kHz."""
    frames = frame_count(num_samples)
    return 1 + (frames - EXAMPLE_FRAMES) // EXAMPLE_HOP if frames >= EXAMPLE_FRAMES else 0


def periodic_hann(length: int = WINDOW) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi / length * np.arange(length))


def hz_to_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_matrix() -> np.ndarray:
    """[257, 64] weights: magnitude spectrum row @ matrix = mel band energies."""
    bins_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT // 2 + 1))
    edges = np.linspace(hz_to_mel(MEL_MIN_HZ), hz_to_mel(MEL_MAX_HZ), MEL_BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # the DC bin belongs to no band
    return weights


_MEL = mel_matrix()
_HANN = periodic_hann()


def log_mel(waves: np.ndarray) -> np.ndarray:
    """Log mel spectrogram, float64 ``[..., frames, 64]`` of 16 kHz ``waves [..., samples]``
    (a batch is equal-length rows)."""
    waves = np.asarray(waves)
    frames = frame_count(waves.shape[-1])
    if frames == 0:
        return np.zeros(waves.shape[:-1] + (0, MEL_BANDS))
    starts = np.arange(frames) * HOP
    windowed = waves[..., starts[:, None] + np.arange(WINDOW)] * _HANN  # float64 from here on
    magnitude = np.abs(np.fft.rfft(windowed, FFT))
    return np.log(magnitude @ _MEL + LOG_OFFSET)


def examples(wave: np.ndarray) -> np.ndarray:
    """The network's input ``[examples, 96, 64]`` float32 for one 16 kHz mono waveform."""
    count = example_count(len(wave))
    mel = log_mel(np.asarray(wave)[: WINDOW + (count * EXAMPLE_FRAMES - 1) * HOP] if count else wave[:0])
    return mel[: count * EXAMPLE_FRAMES].reshape(count, EXAMPLE_FRAMES, MEL_BANDS).astype(np.float32)


# ----------------------------------------------------------------------------- network


def _vggish_modules(layers, hidden: int, final_relu: bool):
    convs, channels = [], 1
    for v in layers:
        if v == "M":
            convs.append(nn.MaxPool2d(2, 2))
        else:
            convs += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    pools = sum(v == "M" for v in layers)
    flat = channels * (EXAMPLE_FRAMES >> pools) * (MEL_BANDS >> pools)
    mlp = [
        nn.Linear(flat, hidden),
        nn.ReLU(True),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Linear(hidden, EMBEDDING_SIZE),
    ]
    if final_relu:
        mlp.append(nn.ReLU(True))
    return nn.Sequential(*convs), nn.Sequential(*mlp)


class VGGish(nn.Module):
    """The VGGish network with torchvggish's parameter names (``features.N.*``, ``embeddings.N.*``);
    ``variant`` towhee leaves the final ReLU out."""

    def __init__(self, layers=REFERENCE_LAYERS, hidden: int = REFERENCE_HIDDEN, variant: str = "torchvggish"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown VGGish variant {variant!r} (choose from {', '.join(VARIANTS)})")
        self.layers, self.hidden, self.variant = tuple(layers), hidden, variant
        self.features, self.embeddings = _vggish_modules(self.layers, hidden, final_relu=variant == "torchvggish")

    def forward(self, x):
        """``[N, 1, 96, 64]`` (or ``[N, 96, 64]``) log-mel examples -> ``[N, 128]`` embeddings."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = self.features(x)  # [N, C, time, freq]
        return self.embeddings(x.permute(0, 2, 3, 1).flatten(1))  # TensorFlow's (time, freq, channel)


def layers_from_state_dict(state: dict) -> tuple[tuple, int]:
    """(conv stack, hidden width) of a torchvggish-layout state dict: the reference topology,
    widths read from the weights (so narrower stand-ins load through the same code)."""
    layers, index = [], 0  # index: position in ``features`` (conv, ReLU, [pool], ...)
    for v in REFERENCE_LAYERS:
        if v == "M":
            layers.append("M")
            index += 1
            continue
        key = f"features.{index}.weight"
        if key not in state:
            raise ValueError(f"not a torchvggish state dict: no {key}")
        layers.append(int(state[key].shape[0]))
        index += 2
    if "embeddings.0.weight" not in state:
        raise ValueError("not a torchvggish state dict: no embeddings.0.weight")
    return tuple(layers), int(state["embeddings.0.weight"].shape[0])


def load_vggish(path: str, map_location="cpu", variant: str = "torchvggish") -> VGGish:
    """A VGGish (``variant``: see ``VARIANTS``) from a torchvggish-layout ``.pth`` (e.g.
    ``vggish-10086976.pth``), loaded with ``weights_only=True`` and strict key matching."""
    state = load_tensors(path, "a torchvggish-layout state dict .pth", map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (expected the torchvggish layout)")
    try:
        layers, hidden = layers_from_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = VGGish(layers, hidden, variant)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the VGGish layout: {e}") from None
    return model.eval()


# ----------------------------------------------------------------------------- PCA


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs: data only, no code (the released PCA file)."""
    dtype_classes = [type(np.dtype(t)) for t in ("float32", "float64")]
    return [numpy_multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def load_pca_params(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(eigen vectors [128, 128], means [128]) float32 from a ``vggish_pca_params`` ``.pth``."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        params = torch.load(path, map_location="cpu", weights_only=True)
    try:
        eigen = np.asarray(params["pca_eigen_vectors"], dtype=np.float32)
        means = np.asarray(params["pca_means"], dtype=np.float32).reshape(-1)
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: expected a dict with pca_eigen_vectors and pca_means") from None
    if eigen.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise ValueError(
            f"{path}: pca_eigen_vectors {eigen.shape} / pca_means {means.shape}, "
            f"expected ({EMBEDDING_SIZE}, {EMBEDDING_SIZE}) / ({EMBEDDING_SIZE},)"
        )
    return eigen, means


def postprocess(embeddings, eigen, means):
    """AudioSet PCA whitening + 8-bit quantisation of ``[N, 128]`` torch embeddings (float32
    values 0..255)."""
    eigen = torch.as_tensor(eigen, device=embeddings.device)
    means = torch.as_tensor(means, device=embeddings.device)
    whitened = torch.mm(eigen, embeddings.t() - means[:, None]).t()
    clipped = whitened.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
    return torch.round((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)))


# ----------------------------------------------------------------------------- together


@dataclass
class VGGishEmbedder:
    """A loaded network and, optionally, the PCA params: ``examples -> [N, 128]`` float32."""

    network: VGGish
    pca: tuple | None = None
    max_batch: int = 256  # examples per forward

    @property
    def device(self):
        return next(self.network.parameters()).device

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``[N, 96, 64]`` examples -> ``[N, 128]`` float32 (post-processed if PCA params are set)."""
        out = np.zeros((len(batch), EMBEDDING_SIZE), np.float32)
        with torch.inference_mode():
            for start in range(0, len(batch), self.max_batch):
                x = torch.from_numpy(np.ascontiguousarray(batch[start : start + self.max_batch])).to(self.device)
                y = self.network(x)
                if self.pca is not None:
                    y = postprocess(y, *self.pca)
                out[start : start + len(x)] = y.float().cpu().numpy()
        return out
