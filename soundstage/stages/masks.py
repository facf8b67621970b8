"""masks: Stepping Stones' stage-1 "stepping-stone" masks, for every frame of every clip.

Two sources, exactly one per output:

- ``--run runs/STAGE1`` (``--weights best|last``, default best when the run has a ``model/best``):
  a binary (class-agnostic) run of ``soundstage train`` predicts every
  frame of every clip — all splits, annotated or not — with the cues it was trained on
  (``soundstage.train.inference``; batched over clips, autocast in ``--dtype`` on a GPU). The
  fingerprint holds the run's identity: the content hash of its weights, its cue outputs'
  fingerprints and its input size (``run_identity``), never its path.
- ``--import DIR``: masks someone released in the Stepping Stones layout
  ``DIR/<label>/<uid>/<i>.png`` (label = v1s / v1m / v2, i = 0-based frame): single channel,
  ``--size`` x ``--size``, values 0 and 255 only, one file per frame of the clip; anything else
  is a recorded failure naming the file. The fingerprint holds the content hash of the PNGs.

Stored per clip: ``probs`` uint8 ``[frames, size, size]``, the foreground probability as
round(255 p) (imported masks: 0 or 255), at ``--size`` (224, the size Stepping Stones' stage 2
reads). uint8 rather than float16: half the bytes (parts are stored uncompressed, see the
cache layout; 49 KiB instead of 98 KiB per 224 x 224 frame), and the rounding error (at most
0.002) is far below the 0.4 / 0.5 / 0.6 levels the prior is cut at. ``soundstage export masks``
writes them back as 0/255 PNGs.
"""

import os

import numpy as np
from PIL import Image

from soundstage.device import device_param, dtype_param
from soundstage.manifests.table import frame_path
from soundstage.pipeline.identity import cached_file_sha256, stable_hash
from soundstage.pipeline.stage import ClipError, Field, Param, Stage

DEFAULT_SIZE = 224


def released_path(folder: str, row: dict, frame: int) -> str:
    """``folder/<label>/<uid>/<frame>.png`` of the Stepping Stones layout."""
    return os.path.join(folder, str(row["subset"]), str(row["clip_id"]), f"{frame}.png")


def import_identity(folder):
    """Content hash of every PNG under ``folder`` (names relative to it)."""
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--import {folder}: no such folder")
    files = {
        os.path.relpath(os.path.join(root, n), folder): cached_file_sha256(os.path.join(root, n))
        for root, _dirs, names in os.walk(folder)
        for n in names
        if n.endswith(".png")
    }
    if not files:
        raise ValueError(f"--import {folder}: no PNG masks in it (expected <label>/<uid>/<i>.png)")
    return {"png_files": stable_hash(files, 64), "count": len(files)}


def run_identity(run):
    # brings torch and transformers: planning needs only the run's identity
    from soundstage.train.inference import run_identity as identity

    return identity(run)


def read_released(folder: str, row: dict, frames: int, size: int) -> np.ndarray:
    """``[frames, size, size]`` uint8 0/255 of one clip, validated (see the module docstring)."""
    out = []
    for i in range(frames):
        path = released_path(folder, row, i)
        if not os.path.isfile(path):
            raise ClipError(f"frame {i} of {frames} has no mask: {path}")
        with Image.open(path) as im:
            if im.mode not in ("L", "1"):
                raise ClipError(f"{path}: mode {im.mode}; a mask is a single-channel PNG")
            if im.size != (size, size):
                raise ClipError(f"{path}: {im.size[0]}x{im.size[1]}, expected {size}x{size} (--size)")
            mask = np.asarray(im.convert("L"))
        values = np.unique(mask)
        if not np.isin(values, (0, 255)).all():
            raise ClipError(f"{path}: values {values[:6].tolist()}; a mask holds only 0 and 255")
        out.append(mask)
    return np.stack(out)


def load(row, ctx):
    frames, params = int(row["num_frames"]), ctx.params
    if params["import"]:
        return {"probs": read_released(params["import"], row, frames, params["size"])}
    from soundstage.train.inference import read_frames, run_image_size  # brings torch and transformers: never in decoding workers

    try:
        pixels = read_frames([frame_path(row, i, ctx.manifest_dir) for i in range(frames)], run_image_size(params["run"]))
    except OSError as e:
        raise ClipError(f"unreadable frame: {e}") from None
    return {"clip_id": row["clip_id"], "pixel_values": pixels}


def setup(params):
    if bool(params["run"]) == bool(params["import"]):
        raise ValueError(
            "give exactly one of --run RUN (a trained binary model predicts the masks) "
            "or --import DIR (released masks, <label>/<uid>/<i>.png)"
        )
    if params["size"] < 1:
        raise ValueError(f"--size {params['size']}: the side of the stored maps must be at least 1")
    if params["import"]:
        return None
    from soundstage.train.inference import open_trained  # brings torch and transformers: setup() only

    return open_trained(params["run"], params["device"], params["dtype"], log=lambda *_: None, weights=params["weights"])


def process(model, items, params):
    if model is None:  # imported: read and checked in load
        return [{"probs": item["probs"]} for item in items]
    from soundstage.train.cues import CueError  # brings torch and transformers: never in decoding workers
    from soundstage.train.inference import clip_cues, foreground, to_uint8

    try:
        clips = [
            {
                "pixel_values": it["pixel_values"],
                "clip_id": it["clip_id"],
                **clip_cues(model, it["clip_id"], len(it["pixel_values"])),
            }
            for it in items
        ]
    except CueError as e:
        raise ClipError(str(e)) from None
    return [{"probs": to_uint8(p)} for p in foreground(model, clips, params["size"])]


STAGE = Stage(
    name="masks",
    version=1,
    help="Stepping-stone masks: foreground probability per frame from a trained binary run, or imported PNGs.",
    params=[
        Param("run", str, None, "training run (runs/NAME) of a binary model: predict the masks", identity=run_identity),
        Param("weights", str, None, "--run: best | last (default: best when the run has a model/best, else last)"),
        Param(
            "import",
            str,
            None,
            "instead: folder of released masks <label>/<uid>/<i>.png (0/255, --size square)",
            identity=import_identity,
        ),
        Param("size", int, DEFAULT_SIZE, "side of the stored square probability maps (Stepping Stones: 224)"),
        dtype_param(),
        device_param(),
    ],
    fields=[Field("probs", "uint8", (None, None, None), "[frames, size, size] foreground probability as round(255 p)")],
    reads=("subset", "num_frames", "frames_dir", "frame_pattern"),  # manifest columns load uses (files digested too)
    required_columns=("subset", "num_frames", "frames_dir", "frame_pattern"),
    load=load,
    setup=setup,
    process=process,
    default_batch_size=8,
    resources={"gpus": 1, "cpus": 8, "mem": "32G"},
)


def binary_masks(probs: np.ndarray, size: int, threshold: float) -> np.ndarray:
    """Stored ``probs`` (uint8 ``[T, S, S]``) -> 0/255 uint8 ``[T, size, size]``: foreground where
    p > ``threshold``, after a bilinear resize of p when ``size`` differs from S."""
    p = np.asarray(probs, dtype=np.float32) / 255.0
    if p.shape[1:] != (size, size):
        p = np.stack([np.asarray(Image.fromarray(f, mode="F").resize((size, size), Image.BILINEAR)) for f in p])
    return np.where(p > threshold, 255, 0).astype(np.uint8)
