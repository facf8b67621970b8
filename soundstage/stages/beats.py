"""beats: AudioSet tag probabilities per clip and per second, and per-second BEATs embeddings.

The audio half of the "active queries" preprocessing (bias_in_AVS, ACM MM 2024: AudioSet tags
above 0.4 per second select queries), from an official
fine-tuned BEATs checkpoint (``soundstage.models.beats``). Per clip:

- ``clip_probs``: one pass over the whole clip when it is at most ``clip_window`` seconds long (10 by
  default: BEATs was fine-tuned on 10 s AudioSet clips, and AVSBench clips are 5 or 10 s). A longer
  clip is cut into the fewest equal windows of at most ``clip_window`` seconds and gets the mean of
  their probabilities, so memory stays bounded however long the audio (one pass over a 10-minute
  clip needs memory quadratic in its length); ``clip_window: 0`` keeps one pass at any length;
- ``second_probs``: one pass per 1 s window, second i = samples [16000 i, 16000 (i + 1)), so
  second i lines up with video frame i (AVSBench frames are 1 per second);
- ``second_embeddings``: the mean over that window's patches of the last encoder layer.

The clip has ``num_frames`` seconds when the manifest says so (else as many as the audio
holds, counting a trailing part that is long enough for one BEATs patch, 0.175 s). A window
cut short by the end of the audio is run at its own length, never padded; audio too short for
the frames it must cover is a recorded failure. Only clips of equal length share a batch, so
batched results are those of one clip at a time.

Storage: probabilities and embeddings are float16; the class count C and width D are the
checkpoint's (527 and 768 for the official AudioSet models). Thresholded tags are derived from
these by ``soundstage tags``; class names come from the checkpoint's ``label_dict`` (see
``soundstage.stages.tags``).
"""

import math

import numpy as np
import torch

from soundstage.audio import TARGET_SR, load_audio, max_seconds_param
from soundstage.device import device_param, dtype_param, resolve_device, torch_dtype
from soundstage.manifests.table import frame_count, resolve_path
from soundstage.models.beats import BEATs, min_samples
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.stage import ClipError, Field, Param, Stage

SECOND = TARGET_SR  # samples per window
#: samples one model call takes at most (8 clips of 10 s, or 80 one-second windows): memory per call is bounded
SAMPLES_PER_CALL = 8 * 10 * SECOND
#: default clip_window (seconds): the length BEATs was fine-tuned on (AudioSet clips)
CLIP_WINDOW = 10.0
#: clips longer than this are run alone, after what is finished is committed (see ``Stage.risky``)
RISKY_SECONDS = 120


def second_count(row: dict, num_samples: int) -> int:
    """Seconds (= video frames) the clip covers: ``num_frames`` if given, else from the audio."""
    frames = frame_count(row)
    if frames is not None:
        return frames
    full, rest = divmod(num_samples, SECOND)
    return full + (1 if rest >= min_samples() else 0)


def load(row, ctx):
    wave = load_audio(resolve_path(row["audio_path"], ctx.manifest_dir), max_seconds=ctx.params.get("max_seconds")).wave
    seconds = second_count(row, len(wave))
    if seconds < 1 or len(wave) < min_samples():
        raise ClipError(f"audio of {len(wave) / SECOND:.3f} s is too short for BEATs (needs {min_samples()} samples)")
    last = len(wave) - (seconds - 1) * SECOND  # samples in the last window
    if last < min_samples():
        raise ClipError(
            f"audio of {len(wave) / SECOND:.3f} s does not cover {seconds} frames "
            f"(second {seconds - 1} has {max(last, 0)} samples, BEATs needs {min_samples()})"
        )
    return {"wave": wave, "seconds": seconds}


def batch_key(item):
    return len(item["wave"])  # only equal-length clips share a batch: no padding


def setup(params):
    device = resolve_device(params["device"])
    dtype = torch_dtype(params["dtype"])
    if dtype != torch.float32 and not device.startswith("cuda"):
        raise ValueError(f"--dtype {params['dtype']} is meant for GPUs; use fp32 on {device}")
    if not params["checkpoint"]:
        raise ValueError(
            "--checkpoint is required: an official fine-tuned BEATs .pt (e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)"
        )
    model = BEATs.from_checkpoint(params["checkpoint"], map_location="cpu")
    if model.predictor is None:
        raise ValueError(
            f"{params['checkpoint']} is a pre-trained BEATs without a classifier; "
            "the beats stage needs a fine-tuned (AudioSet) checkpoint"
        )
    model.class_mids  # noqa: B018 - fails early when the checkpoint has no label_dict
    return model.to(device=device, dtype=dtype).eval()


def metadata(model, params) -> dict:
    """The AudioSet MIDs of the probability columns, so tags never need the checkpoint again."""
    return {"class_mids": list(model.class_mids)}


def _run(model, waves: list) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C], mean patch features [N, D]) of equal-length waveforms, float32 numpy."""
    batch = torch.from_numpy(np.stack(waves))
    device = model.patch_embedding.weight.device
    if device.type == "cuda":
        batch = batch.pin_memory()  # lets the host-to-device copy run asynchronously
    with torch.inference_mode():
        features, _ = model.encode(batch.to(device, non_blocking=True))
        probs = model.classify(features)
        return probs.float().cpu().numpy(), features.mean(dim=1).float().cpu().numpy()


def _run_all(model, waves: list) -> tuple[np.ndarray, np.ndarray]:
    """``_run`` over any number of waveforms: equal lengths share calls of at most SAMPLES_PER_CALL."""
    probs, features = [None] * len(waves), [None] * len(waves)
    for length in sorted({len(w) for w in waves}):
        same = [k for k, w in enumerate(waves) if len(w) == length]
        per_call = max(1, SAMPLES_PER_CALL // length)
        for start in range(0, len(same), per_call):
            chunk = same[start : start + per_call]
            p, e = _run(model, [waves[k] for k in chunk])
            for j, k in enumerate(chunk):
                probs[k], features[k] = p[j], e[j]
    return np.stack(probs), np.stack(features)


def clip_windows(wave: np.ndarray, window_seconds: float) -> list[np.ndarray]:
    """The fewest equal windows of at most ``window_seconds`` (0: the whole clip)."""
    count = math.ceil(len(wave) / (window_seconds * SECOND)) if window_seconds else 1
    return np.array_split(wave, max(count, 1))


def process(model, items, params):
    # clip level: the mean over each clip's windows (one window for a clip no longer than clip_window)
    windows = [(i, w) for i, item in enumerate(items) for w in clip_windows(item["wave"], params.get("clip_window", CLIP_WINDOW))]
    window_probs, _ = _run_all(model, [w for _, w in windows])
    owner = np.array([i for i, _ in windows])
    clip_probs = [window_probs[owner == i].mean(axis=0) for i in range(len(items))]
    # every second of every clip; full seconds all have SECOND samples and share calls
    seconds = [
        (i, s, item["wave"][s * SECOND : (s + 1) * SECOND]) for i, item in enumerate(items) for s in range(item["seconds"])
    ]
    probs, embeddings = _run_all(model, [w for _, _, w in seconds])
    out = []
    for i in range(len(items)):
        mine = [k for k, (owner_i, _, _) in enumerate(seconds) if owner_i == i]
        out.append({"clip_probs": clip_probs[i], "second_probs": probs[mine], "second_embeddings": embeddings[mine]})
    return out


def risky(item) -> bool:
    return len(item["wave"]) > RISKY_SECONDS * SECOND


STAGE = Stage(
    name="beats",
    reads=("audio_path", "num_frames"),  # manifest columns load uses (their files are digested too)
    required_columns=("audio_path",),
    version=1,
    help="BEATs AudioSet tag probabilities per clip and per second, and per-second embeddings.",
    params=[
        Param(
            "checkpoint", str, None, "official fine-tuned BEATs checkpoint .pt (cfg, model, label_dict)", identity=model_identity
        ),
        Param(
            "clip_window",
            float,
            CLIP_WINDOW,
            "clip_probs of a clip longer than this (seconds): the mean over the fewest "
            "equal windows no longer than this, so memory stays bounded (0: one pass at any length)",
        ),
        max_seconds_param(),
        dtype_param(),
        device_param(),
    ],
    fields=[
        Field(
            "clip_probs",
            "float16",
            (None,),
            "[classes] sigmoid probabilities: one pass over the clip, or the mean over its clip_window windows",
        ),
        Field("second_probs", "float16", (None, None), "[seconds, classes] one pass per 1 s window (= video frame)"),
        Field("second_embeddings", "float16", (None, None), "[seconds, dim] mean last-layer patch features per second"),
    ],
    load=load,
    setup=setup,
    metadata=metadata,
    process=process,
    batch_key=batch_key,
    risky=risky,
    default_batch_size=8,
    resources={"gpus": 1, "cpus": 8, "mem": "32G"},
)
