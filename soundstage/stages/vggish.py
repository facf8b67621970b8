"""vggish: 128-d VGGish embeddings per 0.96 s of audio, as the AVS trainers consume them.

Front end, network and PCA post-processing are those of torchvggish / the TensorFlow AudioSet
release (``soundstage.models.vggish``). ``--variant`` picks the network: ``torchvggish``
(AVSBench's; embeddings >= 0) or ``towhee`` (towhee's ``ops.audio_embedding.vggish()``, which
Stepping Stones, SegPref, GAVS and bias_in_AVS used: no final ReLU, signed embeddings). Audio that
is not at 16 kHz is averaged over channels and resampled with resampy's ``kaiser_best`` filter,
as both references do. The log-mel examples are computed in the decoding workers; the network
runs on the examples of a whole batch of clips at once (any lengths).

Rows per clip: with ``num_frames`` in the manifest exactly that many (one per video frame):
extra examples are dropped, missing ones padded by ``--pad`` — ``repeat-last`` (AVSBench's
preprocessing: a 4.8 s clip gives 4 examples and its 5th row repeats the 4th) or ``zero`` (rows
of zeros). Without ``num_frames``: exactly the examples the reference gives. ``raw_patches`` is
how many examples the audio gave. Audio shorter than one example (15,600 samples at 16 kHz,
0.975 s) is a recorded clip failure.

``--pca-params`` (the released ``vggish_pca_params-970ea276.pth``) stores the AudioSet-style
post-processed embeddings (PCA whitening, clip to [-2, 2], 0..255 as float32); without it the
raw embeddings (>= 0, AVSBench's choice). towhee's operator has no post-processing, so
``--pca-params`` is refused with ``--variant towhee``.

``embed_waveform`` gives the same rows for any waveform (e.g. digital silence for a "muted
audio" cue) with a model from ``setup``.
"""

import numpy as np

from soundstage.audio import TARGET_SR, load_audio, max_seconds_param, resample_kaiser_best
from soundstage.device import device_param, resolve_device
from soundstage.manifests.table import frame_count, resolve_path
from soundstage.models import vggish
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.stage import ClipError, Field, Param, Stage

PAD_CHOICES = ("repeat-last", "zero")


def row_count(row: dict, raw: int) -> int:
    """Rows the clip gets: ``num_frames`` when the manifest has it, else the examples the audio gave."""
    frames = frame_count(row)
    return raw if frames is None else frames


def fit_rows(embeddings: np.ndarray, rows: int, pad: str) -> np.ndarray:
    """``embeddings [raw, 128]`` cut or padded to ``rows`` (``pad``: repeat-last | zero)."""
    if len(embeddings) >= rows:
        return embeddings[:rows]
    if pad == "repeat-last":
        filler = np.repeat(embeddings[-1:], rows - len(embeddings), axis=0)
    else:
        filler = np.zeros((rows - len(embeddings), embeddings.shape[1]), embeddings.dtype)
    return np.concatenate([embeddings, filler])


def examples_of(wave: np.ndarray) -> np.ndarray:
    """The examples of a 16 kHz waveform; too-short audio is a ``ClipError``."""
    found = vggish.examples(wave)
    if len(found) == 0:
        raise ClipError(
            f"audio of {len(wave) / TARGET_SR:.3f} s is too short for one VGGish example "
            f"(needs {vggish.MIN_SAMPLES} samples, {vggish.MIN_SAMPLES / TARGET_SR:.3f} s)"
        )
    return found


def embed_waveform(
    model: vggish.VGGishEmbedder, waveform: np.ndarray, sample_rate: int, params: dict, num_frames: int | None = None
) -> np.ndarray:
    """``[rows, 128]`` float32 for a mono ``waveform``, exactly as the stage stores it (resampled
    to 16 kHz as the stage does; ``params["pad"]`` pads to ``num_frames``)."""
    wave = resample_kaiser_best(np.asarray(waveform, np.float32), sample_rate, TARGET_SR)
    found = examples_of(wave)
    rows = len(found) if num_frames is None else num_frames
    return fit_rows(model.embed(found[:rows]), rows, params.get("pad", "repeat-last"))


def clip_examples(path: str, max_seconds: float | None = None) -> np.ndarray:
    """Every log-mel example ``[N, 96, 64]`` of an audio file, exactly as the stage computes them
    (also what ``soundstage export log-mel`` writes); too-short audio is a ``ClipError``."""
    return examples_of(load_audio(path, max_seconds=max_seconds, resampler=resample_kaiser_best).wave)


def load(row, ctx):
    found = clip_examples(resolve_path(row["audio_path"], ctx.manifest_dir), ctx.params.get("max_seconds"))
    rows = row_count(row, len(found))
    if rows < 1:
        raise ClipError(f"num_frames {row.get('num_frames')!r}: a clip needs at least one row")
    return {"examples": found[:rows], "raw": len(found), "rows": rows}


def setup(params):
    if not params["checkpoint"]:
        raise ValueError("--checkpoint is required: a torchvggish-layout .pth (e.g. vggish-10086976.pth)")
    if params["pca_params"] and params["variant"] == "towhee":
        raise ValueError("--pca-params applies to --variant torchvggish only (towhee's VGGish has no post-processing)")
    network = vggish.load_vggish(params["checkpoint"], variant=params["variant"]).to(resolve_device(params["device"]))
    pca = vggish.load_pca_params(params["pca_params"]) if params["pca_params"] else None
    return vggish.VGGishEmbedder(network, pca)


def process(model, items, params):
    embeddings = model.embed(np.concatenate([item["examples"] for item in items]))
    ends = np.cumsum([len(item["examples"]) for item in items])
    return [
        {"embeddings": fit_rows(e, item["rows"], params["pad"]), "raw_patches": item["raw"]}
        for item, e in zip(items, np.split(embeddings, ends[:-1]))
    ]


STAGE = Stage(
    name="vggish",
    reads=("audio_path", "num_frames"),  # manifest columns load uses (their files are digested too)
    required_columns=("audio_path",),
    version=2,  # 2: resampy kaiser_best for non-16 kHz audio (was scipy's polyphase filter)
    help="VGGish embeddings (128-d per 0.96 s, torchvggish front end and layout), one row per video frame.",
    params=[
        Param("checkpoint", str, None, "torchvggish-layout state dict .pth (vggish-10086976.pth)", identity=model_identity),
        Param(
            "variant",
            str,
            "torchvggish",
            "torchvggish: final ReLU, embeddings >= 0 (AVSBench); towhee: no final ReLU, signed "
            "(towhee's operator: Stepping Stones, SegPref, GAVS, bias_in_AVS)",
            choices=vggish.VARIANTS,
        ),
        Param(
            "pca_params",
            str,
            None,
            "vggish_pca_params .pth: store PCA-whitened 8-bit values (AudioSet release style) instead of the raw embeddings",
            identity=model_identity,
        ),
        Param(
            "pad",
            str,
            "repeat-last",
            "with num_frames: fill missing rows by repeating the last one (AVSBench) or with zeros",
            choices=PAD_CHOICES,
        ),
        device_param(),
        max_seconds_param(),
    ],
    fields=[
        Field(
            "embeddings",
            "float32",
            (None, vggish.EMBEDDING_SIZE),
            "[rows, 128] one per 0.96 s example (= video frame with num_frames)",
        ),
        Field("raw_patches", "int32", (), "examples the audio gave before cutting/padding to num_frames"),
    ],
    load=load,
    setup=setup,
    process=process,
    default_batch_size=32,
    resources={"gpus": 1, "cpus": 8, "mem": "16G"},
)
