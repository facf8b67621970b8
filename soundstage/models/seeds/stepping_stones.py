"""Stepping Stones (ECCV 2024, GeWu-Lab/Stepping-Stones): the adaptive audio-visual segmenter (AAVS)
of its two stages.

What their code computes — stage 1 ``avs/avs_model.py::AdaptiveAVS`` with the transformers copy
under ``avs/transformers``, stage 2 ``avss/avs_model.py::AdaptiveAVS`` with ``avss/transformers``
(both 4.35.2 packages whose Mask2Former modelling file is modified) — built around an unchanged
transformers ``Mask2FormerForUniversalSegmentation`` (``soundstage.models.seeds.adapters``):

- Swin adapters ``swin_adapt_1`` / ``swin_adapt_3`` (residual bottlenecks on each block's attention
  and MLP outputs) and replacing ``avs_adapt`` adapters on the pixel decoder's deformable attention
  and the masked-attention decoder's self-attention. Stage 1 **skips** the projection before them
  (``output_proj`` / ``out_proj`` are commented out in ``avs/transformers``; their weights stay in
  the state dict, unused); stage 2 applies it, then the adapter.
- Audio: ``audio_proj`` ``[128] -> 512 -> ReLU -> 256`` per frame (``a_t``); each query's features
  get ``cos(e_q, a_t) · a_t`` added before the decoder, ``e_q`` the query's learned position
  embedding (``queries_embedder``).
- Stage-2 prior ``p [N, H, W]`` in [0, 1] (the ground-truth foreground in training, the stage-1
  masks / 255 at evaluation), ``soundstage.models.avs_mask2former.MaskPrior``: added to the mask
  features on every channel (bilinear to their size); per feature level, one of three learned
  embeddings — their ``silence_embed`` where ``p <= 0.4``, ``uncertain_embed`` in between,
  ``audio_embed`` where ``p >= 0.6`` (``p`` bilinear to the level; here the rows 0, 1, 2 of
  ``prior.regions``) — added to the position embeddings; the **first** decoder layer's attention
  mask is replaced by ``p < 0.5`` (bilinear to the first level; masked where true; a query whose
  every position is masked then attends everywhere, as the decoder does for any mask).
- Post-processing: stage 1 (``binary_scores``) — softmax over all classes, the first two kept, times
  the sigmoid of the mask logits resized bilinearly to the processed size (384), summed over
  queries, resized bilinearly to the image size: ``[N, 2, H, W]`` (background, sounding); their IoU
  takes the argmax, their F ``sigmoid(2·s1 − s0)``. Stage 2 (``semantic_scores``) — the same without
  the no-object class (softmax then drop it), argmax after resizing.
- Loss: transformers' Mask2Former loss (class 2, mask 5, dice 5, no-object 0.1; the Hungarian matching
  with a class cost of 1, as transformers 4.35's loss built its matcher) on per-class binary
  masks of the labels at the processed size (their image processor's targets, ``mask_targets``:
  background is class 0).
  Stage 1 returns 0 for a clip whose every frame has empty ground truth (their ``get_loss``, meant for
  MS3: only MS3 has such clips).
- 30 queries and 2 labels for AVS (stage 1), 100 queries and 71 labels for AVSS (stage 2), as their
  ``.models/config.json``.

Module names follow theirs, so their checkpoints map onto ours by the Swin renames of
``adapters.legacy_state_dict`` and the three region embeddings stacked into ``prior.regions``:
``model.…`` (the transformers model), ``audio_proj.…``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from soundstage.models.avs_mask2former import MaskPrior
from soundstage.models.seeds.adapters import add_replacing_adapters, add_swin_adapters, legacy_state_dict
from soundstage.models.seeds.base import SeedModel, legacy_matcher, load_seed_state, reference_mask2former

PROCESSED_SIZE = 384  # their image processor's output size; mask logits are resized to it
IMAGE_SIZE = 224  # their masks and predictions
#: their region embeddings, in the order of ``MaskPrior.regions`` (p <= 0.4, in between, p >= 0.6)
REGION_EMBEDDINGS = ("silence_embed", "uncertain_embed", "audio_embed")
STAGE_SHAPES = {1: {"num_queries": 30, "num_labels": 2}, 2: {"num_queries": 100, "num_labels": 71}}
AUDIO_HIDDEN = 512
#: their checkpoint's top-level prefixes -> ours (the same names; the Swin keys are renamed)
KEY_PREFIXES = {"model.": "model."}


class SteppingStones(SeedModel):
    """``model`` (transformers Mask2Former with the adapters) + ``audio_proj``; ``stage`` 1 or 2."""

    FILE_STEM, MASK2FORMER = "stepping_stones", "model"

    def __init__(self, mask2former, stage: int = 1, audio_dim: int = 128):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"Stepping Stones has stages 1 and 2, not {stage}")
        add_swin_adapters(mask2former.model.pixel_level_module.encoder)
        add_replacing_adapters(mask2former.model, skip_projection=stage == 1)
        legacy_matcher(mask2former)
        hidden = mask2former.config.hidden_dim
        transformer = mask2former.model.transformer_module
        self.model = mask2former
        self.audio_proj = nn.Sequential(nn.Linear(audio_dim, AUDIO_HIDDEN), nn.ReLU(), nn.Linear(AUDIO_HIDDEN, hidden))
        self.prior = MaskPrior(hidden) if stage == 2 else None
        self.stage = stage
        self.settings = {"stage": stage, "audio_dim": audio_dim}
        self._audio = None
        transformer.decoder.register_forward_pre_hook(self._condition_queries, with_kwargs=True)
        if self.prior is not None:
            self.prior.install(transformer)

    @property
    def config(self):
        return self.model.config

    @property
    def num_classes(self) -> int:
        return self.config.num_labels

    def _condition_queries(self, module, args, kwargs):
        queries = kwargs["inputs_embeds"]  # [Q, N, C]
        audio = self._audio[None].to(queries.dtype)  # [1, N, C]
        similarity = F.cosine_similarity(kwargs["query_position_embeddings"], audio, dim=-1)  # [Q, N]
        kwargs["inputs_embeds"] = queries + similarity[..., None] * audio
        return args, kwargs

    # ------------------------------------------------------------------ forward

    def forward(self, pixel_values, audio, prior=None, mask_labels=None, class_labels=None):
        """``pixel_values [N, 3, S, S]``, ``audio [N, D]`` (one row per frame), ``prior [N, H, W]``
        (stage 2); with ``mask_labels``/``class_labels`` (Mask2Former targets per frame) the output
        carries transformers' Mask2Former loss. Returns transformers' Mask2Former output."""
        if (prior is None) == (self.stage == 2):
            raise ValueError("Stepping Stones stage 2 takes a prior per frame; stage 1 takes none")
        self._audio = self.audio_proj(audio.float())
        try:
            with self.prior.applied(prior) if prior is not None else contextlib.nullcontext():
                return self.model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        finally:
            self._audio = None

    @staticmethod
    def binary_scores(outputs, size, processed_size=(PROCESSED_SIZE, PROCESSED_SIZE)) -> torch.Tensor:
        """Stage 1's ``[N, 2, H, W]`` (background, sounding) at ``size`` (their
        ``post_process_binary_segmentation``; ``processed_size``: the model's input size)."""
        classes = outputs.class_queries_logits.softmax(-1)[..., :2]
        return _scores(classes, outputs.masks_queries_logits, size, processed_size)

    @staticmethod
    def semantic_scores(outputs, size, processed_size=(PROCESSED_SIZE, PROCESSED_SIZE)) -> torch.Tensor:
        """Stage 2's ``[N, C, H, W]`` class scores at ``size`` (their ``post_process_semantic_segmentation``
        before the argmax)."""
        classes = outputs.class_queries_logits.softmax(-1)[..., :-1]
        return _scores(classes, outputs.masks_queries_logits, size, processed_size)


def _scores(classes: torch.Tensor, masks: torch.Tensor, size, processed_size) -> torch.Tensor:
    """``Σ_q p(c|q)·sigmoid(m_q)`` with the masks at the processed size, resized to ``size``."""
    masks = F.interpolate(masks, size=tuple(processed_size), mode="bilinear", align_corners=False).sigmoid()
    scores = torch.einsum("nqc,nqhw->nchw", classes, masks)
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def key_map(state: dict) -> dict:
    """A state dict saved by their code (``model.model.…``, ``audio_proj.…``, transformers 4.35
    Swin names, stage 2's three region embeddings) -> ours; ours passes unchanged."""
    if not any(".attention.self." in k or ".encoder.encoder.layers." in k for k in state):
        return state
    regions = [f"model.model.transformer_module.{name}.weight" for name in REGION_EMBEDDINGS]
    state = dict(state)
    if all(k in state for k in regions):
        state["prior.regions.weight"] = torch.cat([state.pop(k) for k in regions])
    return legacy_state_dict(state, KEY_PREFIXES)


def mask_targets(labels: torch.Tensor, size) -> tuple[list, list]:
    """Their image processor's Mask2Former targets: per frame, the labels resized to ``size`` by
    nearest neighbour with PIL's pixel-centre rule (``nearest-exact``; the processor resizes with
    PIL) and one binary mask per class present (background 0 included), with the class ids."""
    labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()
    mask_labels, class_labels = [], []
    for frame in labels:
        classes = torch.unique(frame)
        mask_labels.append((frame[None] == classes[:, None, None]).float())
        class_labels.append(classes)
    return mask_labels, class_labels


class SteppingStonesReference(SteppingStones):
    """The reference interface (``soundstage.train.recipes.load_reference``): one clip of T frames
    with the tensors their ``AdaptiveAVS.forward`` takes."""

    @torch.no_grad()
    def reference_forward(self, pixel_values, audio, prior=None, image_size=(IMAGE_SIZE, IMAGE_SIZE)) -> dict:
        """``pixel_values [T,3,384,384]``, ``audio [T,128]``, ``prior [T,224,224]`` (stage 2) or None,
        ``image_size (H, W)`` -> ``pred`` (stage 1: ``[T,2,H,W]`` scores; stage 2: ``[T,H,W]`` class
        map), ``class_queries_logits [T,Q,C+1]``, ``masks_queries_logits [T,Q,h,w]``."""
        outputs = self.forward(pixel_values, audio, prior)
        processed = pixel_values.shape[-2:]
        if self.stage == 1:
            pred = self.binary_scores(outputs, image_size, processed)
        else:
            pred = self.semantic_scores(outputs, image_size, processed).argmax(1)
        return {
            "pred": pred,
            "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
        }


def load_reference(state_dict: dict, mask2former_config: dict | None, stage: int = 1) -> SteppingStonesReference:
    """Their state dict (``model.model.…``, ``audio_proj.…``) in our model; every key must be used
    and every tensor of ours present, except the Swin ``layernorm`` today's backbone has and never uses.
    ``mask2former_config`` None: the real base model from a local folder or the Hugging Face cache,
    with the stage's queries and labels."""
    state = key_map(state_dict)
    shape = STAGE_SHAPES[stage]
    labels = {"id2label": {i: str(i) for i in range(shape["num_labels"])}}
    mask2former = reference_mask2former(mask2former_config, **shape, **labels)
    model = SteppingStonesReference(mask2former, stage=stage, audio_dim=state["audio_proj.0.weight"].shape[1])
    return load_seed_state(model, state, f"Stepping Stones stage-{stage}")
