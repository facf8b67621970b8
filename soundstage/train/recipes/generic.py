"""``generic``: soundstage's own audio-conditioned Mask2Former (``soundstage.models.avs_mask2former``).

Not a paper's model: transformers' Mask2Former with the audio (and text) cues added to the
decoder queries (``--conditioning add | cosine | none``), optionally Stepping Stones' mask prior
(``--prior masks``); trained with transformers' Mask2Former loss (class 2, mask 5, dice 5,
no-object 0.1) and scored on its semantic inference (softmax without no-object × sigmoid masks).
Every setting is ``TrainConfig``'s default; it is the recipe when ``--recipe`` is not given.
"""

from __future__ import annotations

import torch

import soundstage.train.assemble as assemble
from soundstage.models.avs_mask2former import AVSMask2Former
from soundstage.train.distributed import frame_keys
from soundstage.train.evaluation import model_inputs, predict
from soundstage.train.recipes.recipe import Recipe


def targets(labels: torch.Tensor, device) -> tuple[list, list]:
    """Mask2Former's targets per frame: one binary mask per class present, and the class ids."""
    mask_labels, class_labels = [], []
    for frame in labels:
        classes = torch.unique(frame)
        mask_labels.append((frame[None] == classes[:, None, None]).to(device, torch.get_default_dtype()))
        class_labels.append(classes.to(device))
    return mask_labels, class_labels


def loss(model, batch: dict, device, split_loss=None, step: int = 0, weight: float = 1.0) -> dict:
    """transformers' Mask2Former loss and its parts (class, mask, dice: they add up to it)."""
    mask_labels, class_labels = targets(batch["labels"], device)
    if split_loss is not None:
        split_loss.prepare(class_labels, frame_keys(batch), step, weight, device)
    outputs = model(**model_inputs(batch, device), mask_labels=mask_labels, class_labels=class_labels)
    core = model.module if hasattr(model, "module") else model  # under DDP
    return {"loss": outputs.loss, **core.loss_parts}


RECIPES = [
    Recipe(
        name="generic",
        summary="soundstage's audio-conditioned Mask2Former (add / cosine / text-cue attention, optional mask prior)",
        build=assemble.new_model,
        loss=loss,
        predict=predict,
        load=AVSMask2Former.from_pretrained,
        split_invariant_loss=True,
    )
]
