"""``segpref``: SegPref (ECCV 2024), model in ``soundstage.models.seeds.segpref``.

Cues: towhee's VGGish (``--audio vggish --audio-select variant=towhee``) and the text cues as
SegPref forms them (``--text-cues --text-select slots=segpref``: the textcues stage run with
``--encoder imagebind_huge.pth --slots segpref``, ImageBind-Huge text features ``[4, 1024]`` per
frame, "None" embedded in empty slots). Base model: ``facebook/mask2former-swin-base-ade-semantic``
with its ADE head (only class 0 and no-object are read); without ``--model``, the shipped tiny
config. Frames at 384×384, masks and scoring at 256×256; v1s training clips use frame 0 only.

Settings of their ``run_avs.py`` / ``configs/config.py``: AdamW with torch's defaults (weight decay
0.01) at lr 1e-4, 50 epochs, two clips per batch, no scheduler, no gradient clipping; loss: BCE with
logits on the 256×256 foreground map; protocol ``segpref`` (sigmoid > 0.4, β² 0.3, batches of 4).

What is trained: their ``train_params`` match ``audio_proj``, ``text_proj``, ``prompt_proj``,
``avs_adapt`` and ``avs_attn`` (the queries' prompt block ``ref_avs_attn``); everything else is
frozen — including the text→audio block ``ca``, which therefore stays at its random initialisation
in their training. ``--recipe-option train_text_audio=false`` (default) reproduces that;
``true`` trains ``ca`` as well.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import Mask2FormerForUniversalSegmentation

import soundstage.models.seeds.segpref as seed
import soundstage.train.assemble as assemble
from soundstage.models.seeds.base import UNUSED_BACKBONE_NORM, mask2former_from_config
from soundstage.models.tiny import tiny_config
from soundstage.train.evaluation import model_inputs, two_channel_logits
from soundstage.train.recipes.recipe import Option, Recipe

TRAINED = ("audio_proj", "text_proj", "prompt_proj", "avs_adapt", "avs_attn")
TEXT_AUDIO_BLOCK = "ca."
TINY_LABELS = 2  # the tiny stand-in's head (the real one keeps ADE's 150; only class 0 is read)


def build(cfg, cues):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model is None:
            labels = {"id2label": {i: str(i) for i in range(TINY_LABELS)}}
            mask2former = mask2former_from_config({**tiny_config("mask2former")["config"], "num_labels": TINY_LABELS, **labels})
        else:
            mask2former = Mask2FormerForUniversalSegmentation.from_pretrained(cfg.model)
        return seed.SegPref(mask2former, audio_dim=assemble.cue_width(cues, "audio"), text_dim=assemble.cue_width(cues, "text"))


def trainable(model, cfg) -> list[dict]:
    params = []
    for name, p in model.named_parameters():
        trained = any(n in name for n in TRAINED) or (
            cfg.recipe_options["train_text_audio"] and name.startswith(TEXT_AUDIO_BLOCK)
        )
        p.requires_grad_(trained)
        if trained:
            params.append(p)
    return [{"params": params}]


def foreground(model, batch, device) -> torch.Tensor:
    values = model_inputs(batch, device)
    outputs = model(values["pixel_values"], values["audio"], values["text"])
    return seed.SegPref.foreground(outputs, processed_size=values["pixel_values"].shape[-2:])


def loss(model, batch, device, split_loss=None, step: int = 0, weight: float = 1.0) -> torch.Tensor:
    pred = foreground(model, batch, device)
    gt = (batch["labels"] != 0).float().to(device)
    if tuple(gt.shape[-2:]) != tuple(pred.shape[-2:]):
        gt = F.interpolate(gt[:, None], size=tuple(pred.shape[-2:]), mode="nearest")[:, 0]
    return seed.bce_loss(pred, gt)


def predict(model, batch, device, size, task: str, two_channel: bool) -> torch.Tensor:
    out = foreground(model, batch, device)
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return two_channel_logits(out) if two_channel else out


def load(path: str):
    return seed.SegPref.from_pretrained(path)


RECIPES = [
    Recipe(
        name="segpref",
        summary="SegPref (AVS): ImageBind text cues steer the audio prompt the queries attend to; BCE loss",
        build=build,
        loss=loss,
        predict=predict,
        load=load,
        trainable=trainable,
        settings={
            "task": "binary",
            "audio": "vggish",
            "audio_select": "variant=towhee",
            "text_cues": True,
            "text_select": "slots=segpref",
            "conditioning": "none",
            "lr": 1e-4,
            "weight_decay": 0.01,
            "epochs": 50,
            "batch_size": 2,
            "schedule": "constant",
            "clip_grad": None,
            "mask_size": seed.OUTPUT_SIZE,
        },
        options={
            "train_text_audio": Option(
                False, "also train the text->audio block ca (their training leaves it at its initialisation)"
            )
        },
        key_map=seed.key_map,
        reference=seed.load_reference,
        protocol="segpref",
        unused_keys=UNUSED_BACKBONE_NORM,
    )
]
