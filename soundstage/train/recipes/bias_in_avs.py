"""``bias-in-avs`` and ``bias-in-avs-avss``: bias_in_AVS (ACM MM 2024), model in
``soundstage.models.seeds.bias_in_avs``.

Cues: the VGGish embeddings (AVSBench's torchvggish features, ``--audio vggish``) and the active
queries (``--active active-queries``: per second a list of query ids; a single id primes query 0).
Base model: ``facebook/mask2former-swin-base-ade-semantic`` with its ADE head kept (the first 22
classes for AVS, 71 for AVSS); without ``--model``, the shipped tiny config at hidden width 256 with
100 queries. Settings of their scripts: AVS ``run_avs_m2f.sh`` (AdamW lr 5e-4, 150 epochs, one
video per batch), AVSS ``run.sh`` / ``config.py`` (AdamW lr 1e-4, 240 epochs); AdamW's own weight
decay 0.01, no scheduler, no gradient clipping.

What is trained (``--recipe-option trainable=...``): ``paper`` (default) trains what the paper and
the parameter list mean — AVS: ``audio_proj``, ``avs_adapt``, ``swin_adapt``; AVSS: ``audio_proj``,
``avs_adapt`` — everything else frozen. ``script`` reproduces the AVS script as it ran: its list
misses a comma (``'audio_proj' 'avs_adapt'`` is one name that matches nothing), so only the Swin
adapters train. Evaluation draws the DDPM noise from a generator seeded per clip and frame
(seed 0), so a score does not change between runs; their test draws it afresh.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
from torch.nn import functional as F
from transformers import Mask2FormerForUniversalSegmentation

import soundstage.models.seeds.bias_in_avs as seed
import soundstage.train.assemble as assemble
from soundstage.models.avs_mask2former import tiny_mask2former_spec
from soundstage.models.seeds.base import UNUSED_BACKBONE_NORM, mask2former_from_config
from soundstage.train.evaluation import two_channel_logits
from soundstage.train.recipes.generic import targets
from soundstage.train.recipes.recipe import Option, Recipe

TRAINED = {
    ("avs", "paper"): ("audio_proj", "avs_adapt", "swin_adapt"),
    ("avs", "script"): ("swin_adapt",),
    ("avss", "paper"): ("audio_proj", "avs_adapt"),
    ("avss", "script"): ("audio_proj", "avs_adapt"),
}
EVAL_NOISE_SEED = 0
TINY_OVERRIDES = {"hidden_dim": 256, "feature_size": 256, "mask_feature_size": 256, "num_queries": 100}


def mask2former_arguments(num_labels: int) -> dict:
    """The tiny stand-in's Mask2FormerConfig arguments for this recipe."""
    arguments = {**tiny_mask2former_spec()["config"], **TINY_OVERRIDES, "num_labels": num_labels}
    arguments["id2label"] = {i: str(i) for i in range(num_labels)}
    return arguments


def build(cfg, cues, head: str = "avs"):
    num_classes = seed.AVS_CLASSES if head == "avs" else seed.AVSS_CLASSES
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model is None:
            mask2former = mask2former_from_config(mask2former_arguments(num_classes))
        else:
            mask2former = Mask2FormerForUniversalSegmentation.from_pretrained(cfg.model)
        model = seed.BiasInAVS(mask2former, audio_dim=assemble.cue_width(cues, "audio"), head=head, num_classes=num_classes)
    return model


def trainable(model, cfg) -> list[dict]:
    names = TRAINED[(model.head, cfg.recipe_options["trainable"])]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(n in name for n in names))
        if p.requires_grad:
            params.append(p)
    return [{"params": params}]


def inputs(model, batch: dict, device, noise_seed: int | None = None) -> dict:
    values = {
        "pixel_values": batch["pixel_values"].to(device),
        "audio": batch["audio"].to(device),
        "active": batch["active"].to(device),
        "image_size": batch.get("image_hw"),
    }
    if noise_seed is not None:  # evaluation: the same noise for a frame whatever the batch
        width = model.config.hidden_dim
        values["noise"] = torch.stack([frame_noise(key, noise_seed, width) for key in frame_names(batch)]).to(device)
    return values


def frame_names(batch: dict) -> list[str]:
    return [f"{batch['clip_ids'][c]}/{int(f)}" for c, f in zip(batch["clip_index"].tolist(), batch["frames"].tolist())]


def frame_noise(name: str, seed_value: int, width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed_value * 1_000_003 + zlib.crc32(name.encode())))


def loss(model, batch, device, split_loss=None, step: int = 0, weight: float = 1.0) -> torch.Tensor:
    core = model.module if hasattr(model, "module") else model
    if core.head == "avs":
        labels = (batch["labels"] != 0).float().to(device)
        labels = F.interpolate(labels[:, None], size=(seed.OUTPUT_SIZE,) * 2, mode="nearest")[:, 0]
    else:
        labels = targets(batch["labels"], device)
    return model(**inputs(core, batch, device), labels=labels)["loss"]


def predict(model, batch, device, size, task: str, two_channel: bool) -> torch.Tensor:
    out = model(**inputs(model, batch, device, EVAL_NOISE_SEED))["pred"]
    if out.dim() == 3:  # AVS foreground logits at 256
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return two_channel_logits(out) if two_channel else out
    scores = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
    return scores.clamp_min(1e-6).log()


def load(path: str):
    return seed.BiasInAVS.from_pretrained(path)


def active_encoding(ids: np.ndarray, num_queries: int) -> np.ndarray:
    return seed.active_weights(ids, num_queries)


COMMON = {
    "audio": "vggish",
    "active": "active-queries",
    "conditioning": "none",
    "batch_size": 1,
    "weight_decay": 0.01,
    "schedule": "constant",
    "clip_grad": None,
    "probes": ["muted", "zeroed", "swapped", "noise:10"],
}
OPTIONS = {
    "trainable": Option(
        "paper",
        "what trains: paper (the adapters and audio_proj) | script (AVS: their script's missing comma)",
        ("paper", "script"),
    ),
}


def _recipe(name: str, summary: str, head: str, settings: dict, protocol: str) -> Recipe:
    return Recipe(
        name=name,
        summary=summary,
        build=functools.partial(build, head=head),
        loss=loss,
        predict=predict,
        load=load,
        trainable=trainable,
        settings={**COMMON, **settings},
        options=OPTIONS,
        key_map=seed.key_map,
        reference=functools.partial(seed.load_reference, head=head),
        active_encoding=active_encoding,
        protocol=protocol,
        unused_keys=UNUSED_BACKBONE_NORM,
    )


RECIPES = [
    _recipe(
        "bias-in-avs",
        "bias_in_AVS for AVS (S4/MS3): active-query audio priming, DDPM debias, focal loss",
        "avs",
        {"task": "binary", "lr": 5e-4, "epochs": 150, "mask_size": seed.OUTPUT_SIZE},
        "bias-in-avs",
    ),
    _recipe(
        "bias-in-avs-avss",
        "bias_in_AVS for AVSS (semantic): active-query audio priming, DDPM debias, Mask2Former loss",
        "avss",
        {"task": "semantic", "lr": 1e-4, "epochs": 240, "mask_size": 224},
        "avsbench-semantic",
    ),
]
