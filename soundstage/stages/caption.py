"""caption: one caption per video frame from a transformers image-to-text model.

The first step of the segmentation-preference text cues (SegPref, ECCV 2024: captions -> an LLM's
guess of the sounding objects -> text embeddings). Any model that
``AutoModelForImageTextToText`` loads and whose processor takes images (and optional text)
works through ``--model``: BLIP (default ``Salesforce/blip-image-captioning-large``), BLIP-2,
GIT, vision-encoder-decoder models. ``--prompt`` conditions the caption ("a picture of"); the
stored caption is what the model added after the prompt. Decoding is deterministic (beam search
or greedy), so its parameters are part of the fingerprint.
"""

import os

import numpy as np
from PIL import Image

from soundstage.device import device_param, dtype_param, resolve_device, torch_dtype
from soundstage.manifests.table import frame_count, resolve_path
from soundstage.pipeline.identity import model_identity, model_source
from soundstage.pipeline.stage import ClipError, Field, Param, Stage

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


def frame_paths(row: dict, manifest_dir: str) -> list[str]:
    """Every frame of the clip: ``frames_dir`` + ``frame_pattern`` (``{i}`` 0-based, ``{i1}`` 1-based)."""
    frames_dir = resolve_path(row["frames_dir"], manifest_dir)
    pattern = row.get("frame_pattern") or "{i}.jpg"  # the unified AVSBench layout by default
    return [os.path.join(frames_dir, pattern.format(i=i, i1=i + 1)) for i in range(frame_count(row) or 0)]


def load(row, ctx):
    frames = []
    for path in frame_paths(row, ctx.manifest_dir):
        if not os.path.exists(path):
            raise ClipError(f"frame {path} is missing")
        try:
            with Image.open(path) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:
            raise ClipError(f"frame {path} is unreadable: {e}") from None
    if not frames:
        raise ClipError("clip has no frames (num_frames is 0)")
    return frames


class Captioner:
    def __init__(self, params):
        # heavy; loaded by setup() only, never in decoding workers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(params["device"])
        source = model_source(params["model"], "--model")
        self.processor = AutoProcessor.from_pretrained(source)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype(params["dtype"])).to(self.device).eval()
        )
        self.prompt = params["prompt"] or None
        self.frames_per_call = params["frames_per_call"]
        self.generate_kwargs = dict(num_beams=params["num_beams"], max_new_tokens=params["max_new_tokens"], do_sample=False)

    def __call__(self, images: list) -> list[str]:
        return [
            c
            for start in range(0, len(images), self.frames_per_call)
            for c in self._caption(images[start : start + self.frames_per_call])
        ]

    def _caption(self, images: list) -> list[str]:
        import torch  # not at module level: decoding workers import this module

        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and out.shape[1] > prompt_ids.shape[1]
            and torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            out = out[:, prompt_ids.shape[1] :]  # decoder-only models return prompt + continuation
        captions = self.processor.batch_decode(out, skip_special_tokens=True)
        return [strip_prompt(c, self.prompt) for c in captions]


def strip_prompt(caption: str, prompt: str | None) -> str:
    """The caption without a leading copy of the prompt (BLIP returns prompt + continuation)."""
    caption = " ".join(caption.split())
    if prompt:
        p = " ".join(prompt.split()).lower()
        if caption.lower().startswith(p):
            caption = caption[len(p) :].strip()
    return caption


def process(captioner, items, params):
    images = [frame for frames in items for frame in frames]
    captions = captioner(images)
    results, start = [], 0
    for frames in items:
        results.append({"captions": captions[start : start + len(frames)]})
        start += len(frames)
    return results


STAGE = Stage(
    name="caption",
    reads=("frames_dir", "frame_pattern", "num_frames"),  # manifest columns load uses (their files are digested too)
    required_columns=("frames_dir", "num_frames"),
    version=1,
    help="A caption per video frame from an image-to-text model (BLIP by default).",
    params=[
        Param("model", str, DEFAULT_MODEL, "hub id or local directory of an image-to-text model", identity=model_identity),
        Param("prompt", str, "", "optional text the caption starts from, e.g. 'a picture of'"),
        Param("num_beams", int, 3, "beam search width (1 = greedy)"),
        Param("max_new_tokens", int, 40, "longest caption in tokens"),
        dtype_param(help="model weights dtype"),
        device_param(),
        Param("frames_per_call", int, 64, "images per generate call (bounds memory)", fingerprint=False),
    ],
    fields=[Field("captions", "str", (None,), "caption of frame i")],
    load=load,
    process=process,
    setup=Captioner,
    default_batch_size=4,
    resources={"gpus": 1, "cpus": 4, "mem": "16G"},
)
