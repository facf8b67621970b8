"""``stepping-stones-stage1`` and ``stepping-stones-stage2``: Stepping Stones (ECCV 2024), model in
``soundstage.models.seeds.stepping_stones``.

Cues: towhee's VGGish (``--audio vggish --audio-select variant=towhee``: signed embeddings, what
their loader computes per clip); stage 2 also the stage-1 masks as prior (``--prior masks``: the
masks stage's output of a stage-1 run, ground truth in training and those masks at evaluation).
Base model: ``facebook/mask2former-swin-base-ade-semantic`` with 30 queries / 2 labels (stage 1)
or 100 / 71 (stage 2), class head and (stage 1) queries re-initialised, as their
``.models/config.json``; without ``--model``, the shipped tiny config. Frames: 384×384 input,
masks and scoring at 224×224; v1s training clips repeat frame 0 for every second (their loader).

Their training runs in two phases (``--recipe-option phase=1|2``), AdamW (betas 0.9/0.999, eps 1e-8,
weight decay 0.05), one clip per step, no scheduler, 60 epochs in all; stage 1 clips the gradient
norm at 0.01 (stage 2 does not):

- phase 1 (the first half of the epochs for stage 1, the first third for stage 2): the Swin
  adapters are zeroed and frozen; trained: ``queries_embedder``, ``queries_features`` (stage 1
  only), ``avs_adapt``, ``class_predictor``, ``audio_proj`` and (stage 2) the three region
  embeddings, at ``--lr`` (their 1e-3).
- phase 2 (the rest): their script reloads phase 1's best checkpoint **without** the Swin adapters,
  which therefore start afresh (N(0, 0.02) weights, zero biases: the initialisation
  ``from_pretrained`` gives them), and trains them too at a tenth of ``--lr`` (their 1e-4). Run it as
  a second run: ``--recipe-option phase=2 --init-from PHASE1_RUN/model --epochs 30`` (stage 2: 40).

Evaluation: stage 1 with their protocol ``stepping-stones`` (IoU of the argmax of the two-channel
scores, F of ``sigmoid(2·s1 − s0)``, per video); stage 2 ``avsbench-semantic``. The stage-1 loss is 0
for a clip whose every frame has empty ground truth (their ``get_loss``); here that clip's frames
are left out of the batch's loss and a batch of only such clips gives a zero loss (AdamW still steps
with zero gradients; their loop's ``optimizer.step`` saw no gradient and moved nothing).
"""

from __future__ import annotations

import functools

import torch
from transformers import Mask2FormerForUniversalSegmentation

import soundstage.models.seeds.stepping_stones as seed
import soundstage.train.assemble as assemble
from soundstage.models.seeds.base import UNUSED_BACKBONE_NORM, mask2former_from_config
from soundstage.models.tiny import tiny_config
from soundstage.train.evaluation import model_inputs
from soundstage.train.recipes.recipe import Option, Recipe

TRAINED = {
    1: ("queries_embedder", "queries_features", "avs_adapt", "class_predictor", "audio_proj"),
    2: ("queries_embedder", "avs_adapt", "class_predictor", "audio_proj", "prior.regions"),  # their three region embeddings
}
SWIN_ADAPTERS = "swin_adapt"
PHASE2_LR_FACTOR = 0.1  # their second phase: 1e-4 after 1e-3
PHASE2_INIT_STD = 0.02  # Mask2FormerConfig.init_std: what their rebuilt model's new adapters get


def build(cfg, cues, stage: int):
    shape = seed.STAGE_SHAPES[stage]
    labels = {"id2label": {i: str(i) for i in range(shape["num_labels"])}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model is None:
            arguments = {**tiny_config("mask2former")["config"], "num_labels": shape["num_labels"], **labels}
            mask2former = mask2former_from_config(arguments)
        else:
            mask2former = Mask2FormerForUniversalSegmentation.from_pretrained(
                cfg.model, ignore_mismatched_sizes=True, **shape, **labels
            )
        return seed.SteppingStones(mask2former, stage=stage, audio_dim=assemble.cue_width(cues, "audio"))


def trainable(model, cfg) -> list[dict]:
    """Their ``set_params``: the stage's modules by name; the Swin adapters zeroed and frozen
    (phase 1) or started afresh and trained at a tenth of the learning rate (phase 2)."""
    phase = cfg.recipe_options["phase"]
    generator = torch.Generator().manual_seed(cfg.seed)
    main, adapters = [], []
    for name, p in model.named_parameters():
        if SWIN_ADAPTERS in name:
            with torch.no_grad():
                if phase == 1 or name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * PHASE2_INIT_STD)
            p.requires_grad_(phase == 2)
            if phase == 2:
                adapters.append(p)
            continue
        p.requires_grad_(any(n in name for n in TRAINED[model.stage]))
        if p.requires_grad:
            main.append(p)
    lr = cfg.lr * (PHASE2_LR_FACTOR if phase == 2 else 1.0)
    return [{"params": main + adapters, "lr": lr}]


def inputs(batch: dict, device) -> dict:
    values = model_inputs(batch, device)
    return {k: values[k] for k in ("pixel_values", "audio", "prior") if k in values}


def loss(model, batch, device, split_loss=None, step: int = 0, weight: float = 1.0) -> torch.Tensor:
    core = model.module if hasattr(model, "module") else model
    values = inputs(batch, device)
    labels = batch["labels"]
    keep = torch.ones(len(labels), dtype=torch.bool)
    if core.stage == 1:  # their get_loss: a clip with empty ground truth in every frame gives 0
        foreground = torch.zeros(len(batch["clip_ids"]), dtype=torch.int64)
        foreground.index_add_(0, batch["clip_index"], (labels != 0).flatten(1).any(1).long())
        keep = (foreground > 0)[batch["clip_index"]]
    if not keep.any():
        return model(**values).class_queries_logits.sum() * 0
    if not keep.all():
        values = {k: v[keep.to(v.device)] for k, v in values.items()}
        labels = labels[keep]
    mask_labels, class_labels = seed.mask_targets(labels, values["pixel_values"].shape[-2:])
    mask_labels, class_labels = [m.to(device) for m in mask_labels], [c.to(device) for c in class_labels]
    return model(**values, mask_labels=mask_labels, class_labels=class_labels).loss


def predict(model, batch, device, size, task: str, two_channel: bool) -> torch.Tensor:
    values = inputs(batch, device)
    outputs = model(**values)
    processed = values["pixel_values"].shape[-2:]
    if model.stage == 2:
        return seed.SteppingStones.semantic_scores(outputs, size, processed).clamp_min(1e-6).log()
    scores = seed.SteppingStones.binary_scores(outputs, size, processed)
    if two_channel:  # their protocol reads the scores themselves
        return scores
    log_scores = scores.clamp_min(1e-6).log()
    return log_scores[:, 1] - log_scores[:, 0]  # > 0 where their argmax says sounding


def load(path: str):
    return seed.SteppingStones.from_pretrained(path)


COMMON = {
    "audio": "vggish",
    "audio_select": "variant=towhee",
    "conditioning": "none",
    "epochs": 30,
    "batch_size": 1,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "schedule": "constant",
    "mask_size": seed.IMAGE_SIZE,
    "unlabelled": "repeat",
}
OPTIONS = {
    "phase": Option(1, "their training phase: 1 (Swin adapters zero and frozen) | 2 (Swin adapters trained, lr / 10)", (1, 2)),
}


def _recipe(name: str, summary: str, stage: int, settings: dict, protocol: str) -> Recipe:
    return Recipe(
        name=name,
        summary=summary,
        build=functools.partial(build, stage=stage),
        loss=loss,
        predict=predict,
        load=load,
        trainable=trainable,
        settings={**COMMON, **settings},
        options=OPTIONS,
        key_map=seed.key_map,
        reference=functools.partial(seed.load_reference, stage=stage),
        protocol=protocol,
        unused_keys=UNUSED_BACKBONE_NORM,
    )


RECIPES = [
    _recipe(
        "stepping-stones-stage1",
        "Stepping Stones stage 1 (AVS, class-agnostic): adapters, cosine audio queries, Mask2Former loss",
        1,
        {"task": "binary", "clip_grad": 0.01},
        "stepping-stones",
    ),
    _recipe(
        "stepping-stones-stage2",
        "Stepping Stones stage 2 (AVSS): stage 1's masks as prior (mask features, region embeddings, first attention mask)",
        2,
        {"task": "semantic", "epochs": 20, "clip_grad": None, "prior": "masks", "prior_train": "gt", "prior_eval": "masks"},
        "avsbench-semantic",
    ),
]
