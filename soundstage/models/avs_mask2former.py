"""Audio-conditioned Mask2Former: transformers' ``Mask2FormerForUniversalSegmentation`` plus a
module that adds the audio (and text) cues to the decoder queries.

Composition, not a copy of transformers' modelling code: ``AVSMask2Former`` holds the unchanged
transformers model and a ``QueryConditioner``; a forward pre-hook on the masked-attention
decoder (``model.transformer_module.decoder``) rewrites its ``inputs_embeds`` — the learned
query features ``[queries, images, hidden]`` — before the first layer, so the initial mask
prediction and every layer see the conditioned queries. One image is one video frame; its cue
is the cue of that frame's second.

Conditioning modes (``QueryConditioner.mode``):

The audio cue is first standardised per dimension with statistics of the training split
(buffers ``audio_mean``/``audio_std``, saved with the weights).

- ``add``: the frame's audio vector, projected by an MLP (128 -> 512 -> hidden in the audio
  priming bias work), is added to every query; with active queries (a multi-hot weight per
  query, clamped to [1e-6, 1 - 1e-6] as that work does) each query gets it scaled by its weight.
- ``cosine``: each query q gets ``cos(q, a) * a`` added (a: the projected audio), the adaptive
  audio queries of Stepping Stones.
- ``none``: no audio (a visual-only baseline).

Text cues (``text_dim`` set): the queries also attend to the frame's text-cue slots (projected
to the hidden size) with multi-head attention, masked slots ignored; a frame whose slots are
all masked gets nothing added. This follows the segmentation-preference work, whose queries
attend to cue tokens.

Mask prior (``prior=True``, Stepping Stones' stage 2): each frame comes with a spatial prior
``[N, H, W]``, a foreground probability (the ground-truth mask in training, stage-1 masks at
evaluation, as that work does), used three ways, each at the resolution it meets (bilinear):
added to the pixel decoder's mask features (every channel); as the first masked-attention mask
(positions where the prior is below 0.5 are masked, replacing the mask the initial query
prediction gives; a query with every position masked attends everywhere, as transformers
does for any mask); and as one of three learned embeddings — prior <= 0.4, in between, >= 0.6
— added to the position embeddings of every feature level. Hooks again (``MaskPrior.install``,
which Stepping Stones' model shares): a pre-hook on the transformer module (mask features), one on
the decoder (position embeddings) and a hook on the decoder's mask predictor (its first call only).

Saving: ``save_pretrained(dir)`` writes the transformers model with its own
``save_pretrained`` (config.json + safetensors) and the conditioner as ``avs_conditioning.json``
+ ``avs_conditioning.pt`` (a plain state dict, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    SwinConfig,
)
from transformers.utils import logging as hf_logging

from soundstage.models.tiny import tiny_config

CONDITIONING_CONFIG = "avs_conditioning.json"
CONDITIONING_WEIGHTS = "avs_conditioning.pt"
MODES = ("add", "cosine", "none")
ACTIVE_CLAMP = 1e-6
PRIOR_LOW, PRIOR_HIGH = 0.4, 0.6  # region embeddings: prior <= low / in between / >= high
PRIOR_MASKED_BELOW = 0.5  # first masked-attention mask


class MaskPrior(nn.Module):
    """Stepping Stones' spatial prior (see the module docstring); ``prior`` is ``[N, H, W]`` in [0, 1].

    ``install(transformer)`` hooks it into a transformers ``Mask2FormerTransformerModule``; inside
    ``with prior_module.applied(prior):`` a forward then sees the prior (outside it, nothing changes)."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.regions = nn.Embedding(3, hidden_dim)  # 0: prior <= 0.4, 1: in between, 2: >= 0.6
        self._prior = None  # the frames' prior during a forward
        self._first_mask_pending = False

    @staticmethod
    def resized(prior: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(prior[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]

    @staticmethod
    def region(prior: torch.Tensor) -> torch.Tensor:
        return torch.where(prior <= PRIOR_LOW, 0, torch.where(prior >= PRIOR_HIGH, 2, 1))

    def mask_features(self, features: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return features + self.resized(prior, features.shape[-2:])[:, None].to(features.dtype)

    def position_embeddings(self, embeddings: list, sizes: list, prior: torch.Tensor) -> list:
        """Each level's ``[h*w, N, C]`` position embeddings plus the region embedding of each position."""
        out = []
        for positions, size in zip(embeddings, sizes):
            region = self.region(self.resized(prior, size)).flatten(1).transpose(0, 1)  # [h*w, N]
            out.append(positions + self.regions(region).to(positions.dtype))
        return out

    def attention_mask(self, prior: torch.Tensor, size, heads: int, queries: int) -> torch.Tensor:
        """``[N * heads, queries, h*w]``, True (masked) where the prior is below 0.5."""
        masked = (self.resized(prior, size) < PRIOR_MASKED_BELOW).flatten(1)
        return masked[:, None, None].expand(-1, heads, queries, -1).flatten(0, 1)

    # ------------------------------------------------------------------ hooks

    def install(self, transformer) -> None:
        """Pre-hooks on the transformer module (mask features) and its decoder (position
        embeddings), and a hook on the decoder's mask predictor (its first call: the attention mask)."""
        transformer.register_forward_pre_hook(self._mask_features_hook, with_kwargs=True)
        transformer.decoder.register_forward_pre_hook(self._positions_hook, with_kwargs=True)
        transformer.decoder.mask_predictor.register_forward_hook(self._first_attention_mask_hook)

    @contextlib.contextmanager
    def applied(self, prior: torch.Tensor):
        self._prior, self._first_mask_pending = prior, True
        try:
            yield
        finally:
            self._prior, self._first_mask_pending = None, False

    def _mask_features_hook(self, module, args, kwargs):
        if self._prior is not None:
            kwargs["mask_features"] = self.mask_features(kwargs["mask_features"], self._prior)
        return args, kwargs

    def _positions_hook(self, module, args, kwargs):
        if self._prior is not None:
            kwargs["multi_stage_positional_embeddings"] = self.position_embeddings(
                kwargs["multi_stage_positional_embeddings"], kwargs["feature_size_list"], self._prior
            )
        return args, kwargs

    def _first_attention_mask_hook(self, module, args, output):
        if self._prior is None or not self._first_mask_pending:
            return output
        self._first_mask_pending = False
        predicted, attention_mask = output
        size = args[2] if len(args) > 2 else None
        if size is None:
            raise RuntimeError("the mask predictor was called without its target size; transformers' Mask2Former changed")
        prior_mask = self.attention_mask(self._prior, size, module.num_heads, attention_mask.shape[1])
        return predicted, prior_mask.to(attention_mask.device)


class QueryConditioner(nn.Module):
    def __init__(
        self,
        hidden_dim: int,
        num_queries: int,
        mode: str = "add",
        audio_dim: int | None = None,
        audio_hidden: int = 512,
        text_dim: int | None = None,
        text_heads: int = 1,
        prior: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"conditioning mode must be one of {MODES}, not {mode!r}")
        if mode != "none" and not audio_dim:
            raise ValueError(f"conditioning mode {mode!r} needs the audio cue's width (audio_dim)")
        self.config = {
            "hidden_dim": hidden_dim,
            "num_queries": num_queries,
            "mode": mode,
            "audio_dim": audio_dim,
            "audio_hidden": audio_hidden,
            "text_dim": text_dim,
            "text_heads": text_heads,
            "prior": prior,
        }
        self.prior = MaskPrior(hidden_dim) if prior else None
        self.mode = mode
        self.num_queries = num_queries
        self.audio_proj = None
        # per-dimension standardisation of the audio cue (set from the training split's cues by
        # ``set_audio_statistics``; identity until then): features of frozen audio models often
        # vary by far less than their offset, which a freshly initialised projection cannot see
        self.register_buffer("audio_mean", torch.zeros(audio_dim or 0))
        self.register_buffer("audio_std", torch.ones(audio_dim or 0))
        if mode != "none":
            self.audio_proj = nn.Sequential(nn.Linear(audio_dim, audio_hidden), nn.ReLU(), nn.Linear(audio_hidden, hidden_dim))
        self.text_proj = self.text_attention = None
        if text_dim:
            self.text_proj = nn.Linear(text_dim, hidden_dim)
            self.text_attention = nn.MultiheadAttention(hidden_dim, text_heads)

    def set_audio_statistics(self, cues) -> None:
        """Standardise the audio cue with the mean and std of ``cues [rows, D]`` (e.g. every
        frame of the training split); the std is floored at 1% of its mean over dimensions."""
        cues = torch.as_tensor(cues, dtype=torch.float32)
        std = cues.std(0)
        self.audio_mean.copy_(cues.mean(0))
        self.audio_std.copy_(std.clamp_min(0.01 * float(std.mean()) + 1e-12))

    def forward(self, queries, audio=None, active=None, text=None, text_mask=None):
        """``queries [Q, N, C]``; ``audio [N, D]``; ``active [N, Q]``; ``text [N, S, Dt]`` with
        ``text_mask [N, S]`` (True = a real slot). Returns the conditioned queries."""
        if self.audio_proj is not None:
            if audio is None:
                raise ValueError(f"conditioning mode {self.mode!r} needs an audio cue per frame")
            audio = (audio.to(self.audio_mean.dtype) - self.audio_mean) / self.audio_std
            a = self.audio_proj(audio.to(queries.dtype))[None]  # [1, N, C]
            if self.mode == "add":
                delta = a.expand_as(queries)
                if active is not None:
                    weights = active.to(queries.dtype).clamp(ACTIVE_CLAMP, 1 - ACTIVE_CLAMP)
                    delta = delta * weights.transpose(0, 1)[..., None]
            else:  # cosine
                delta = F.cosine_similarity(queries, a, dim=-1)[..., None] * a
            queries = queries + delta
        if self.text_attention is not None:
            if text is None or text_mask is None:
                raise ValueError("the model was built with text cues: pass text and text_mask per frame")
            slots = self.text_proj(text.to(queries.dtype)).transpose(0, 1)  # [S, N, C]
            any_slot = text_mask.any(dim=1)
            # a frame without any slot attends to all (zero-weighted below) instead of producing NaN
            ignore = ~text_mask & any_slot[:, None]
            attended, _ = self.text_attention(queries, slots, slots, key_padding_mask=ignore, need_weights=False)
            queries = queries + attended * any_slot[None, :, None].to(queries.dtype)
        return queries


LOSS_PARTS = {"cross_entropy": "class", "mask": "mask", "dice": "dice"}


def loss_parts(loss_dict: dict) -> dict:
    """transformers' weighted loss terms (``loss_mask``, ``loss_dice_3``: the auxiliary layer 3's,
    ...) summed per kind: ``{"class", "mask", "dice"}`` (+ any other term under its own name),
    detached; they add up to the loss."""
    parts: dict = {}
    for key, value in loss_dict.items():
        kind = re.sub(r"_\d+$", "", key.removeprefix("loss_"))
        name = LOSS_PARTS.get(kind, kind)
        parts[name] = parts.get(name, 0.0) + value.detach()
    return parts


class AVSMask2Former(nn.Module):
    """``mask2former`` (transformers, unchanged) + ``conditioner`` applied to the decoder queries."""

    def __init__(self, mask2former, conditioner: QueryConditioner):
        super().__init__()
        self.mask2former = mask2former
        self.conditioner = conditioner
        self._cues = None
        self.loss_parts: dict | None = None  # the last forward's loss parts (loss_parts), with labels
        mask2former.get_loss = self._total_loss  # transformers sums the weighted parts; keep them too
        transformer = mask2former.model.transformer_module
        transformer.decoder.register_forward_pre_hook(self._condition_queries, with_kwargs=True)
        if conditioner.prior is not None:
            conditioner.prior.install(transformer)

    @property
    def config(self):
        return self.mask2former.config

    def _condition_queries(self, module, args, kwargs):
        if self._cues is None:
            raise RuntimeError("AVSMask2Former's decoder ran outside AVSMask2Former.forward (no cues)")
        kwargs["inputs_embeds"] = self.conditioner(kwargs["inputs_embeds"], **self._cues)
        return args, kwargs

    def forward(
        self, pixel_values, audio=None, active=None, text=None, text_mask=None, mask_labels=None, class_labels=None, prior=None
    ):
        """One image per frame: ``pixel_values [N, 3, H, W]`` and the cues of the same N frames
        (``prior [N, H', W']`` for a model built with a mask prior). With
        ``mask_labels``/``class_labels`` the output carries transformers' Mask2Former loss, and
        ``self.loss_parts`` its parts (``loss_parts``: class, mask, dice; not in the output, whose
        fields DDP rebuilds)."""
        if (prior is None) != (self.conditioner.prior is None):
            raise ValueError(
                "this model was built with a mask prior: pass prior per frame"
                if prior is None
                else "this model was built without a mask prior; it takes no prior"
            )
        self._cues = {"audio": audio, "active": active, "text": text, "text_mask": text_mask}
        applied = self.conditioner.prior.applied(prior) if prior is not None else contextlib.nullcontext()
        try:
            self.loss_parts = None
            with applied:
                return self.mask2former(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        finally:
            self._cues = None

    def _total_loss(self, loss_dict: dict) -> torch.Tensor:
        self.loss_parts = loss_parts(loss_dict)
        return sum(loss_dict.values())

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with _quiet_progress():
            self.mask2former.save_pretrained(out_dir)
        with open(os.path.join(out_dir, CONDITIONING_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.conditioner.config, f, indent=1)
        torch.save(self.conditioner.state_dict(), os.path.join(out_dir, CONDITIONING_WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str) -> AVSMask2Former:
        conditioning = os.path.join(path, CONDITIONING_CONFIG)
        if not os.path.exists(conditioning):
            raise FileNotFoundError(
                f"{path} holds no audio conditioning ({CONDITIONING_CONFIG}); "
                "it is not a model saved by AVSMask2Former.save_pretrained"
            )
        with open(conditioning, encoding="utf-8") as f:
            conditioner = QueryConditioner(**json.load(f))
        conditioner.load_state_dict(torch.load(os.path.join(path, CONDITIONING_WEIGHTS), weights_only=True))
        with _quiet_progress():
            # in the default dtype, whatever the saved one (an fp64 training run saves float64)
            return cls(Mask2FormerForUniversalSegmentation.from_pretrained(path, dtype=torch.get_default_dtype()), conditioner)


def build_model(
    base: str | None,
    num_labels: int,
    mode: str,
    audio_dim: int | None,
    text_dim: int | None = None,
    num_queries: int | None = None,
    loss_weights: dict | None = None,
    seed: int = 0,
    prior: bool = False,
) -> AVSMask2Former:
    """A new AVS model: ``base`` is a transformers Mask2Former (hub id or folder), whose class
    head is replaced to predict ``num_labels`` classes, or None for the tiny config shipped in
    ``soundstage/data/tiny/mask2former.json`` (random weights, seeded). ``loss_weights``:
    ``class_weight``/``mask_weight``/``dice_weight``/``no_object_weight``; ``prior``: the model
    takes Stepping Stones' mask prior (see the module docstring)."""
    overrides = {"num_labels": num_labels, **(loss_weights or {})}
    if num_queries:
        overrides["num_queries"] = num_queries
    labels = {"id2label": {i: str(i) for i in range(num_labels)}, "label2id": {str(i): i for i in range(num_labels)}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if base is None:
            spec = tiny_mask2former_spec()
            settings = dict(spec["config"])
            backbone = dict(settings.pop("backbone_config"))
            backbone.pop("model_type", None)
            config = Mask2FormerConfig(backbone_config=SwinConfig(**backbone), **{**settings, **overrides}, **labels)
            mask2former = Mask2FormerForUniversalSegmentation(config)
        else:
            mask2former = Mask2FormerForUniversalSegmentation.from_pretrained(
                base, ignore_mismatched_sizes=True, **overrides, **labels
            )
        config = mask2former.config
        conditioner = QueryConditioner(
            config.hidden_dim,
            config.num_queries,
            mode=mode,
            audio_dim=audio_dim,
            text_dim=text_dim,
            text_heads=config.num_attention_heads,
            prior=prior,
        )
    return AVSMask2Former(mask2former, conditioner)


def tiny_mask2former_spec() -> dict:
    """The shipped tiny config: ``{"image_size": S, "config": Mask2FormerConfig arguments}``."""
    return tiny_config("mask2former")


def class_scores(outputs, size) -> torch.Tensor:
    """Per-pixel class scores ``[N, C, H, W]`` at ``size`` (Mask2Former's semantic inference:
    softmax over classes without "no object", times sigmoid of each query's mask, summed over
    queries)."""
    classes = outputs.class_queries_logits.float().softmax(-1)[..., :-1]  # [N, Q, C]
    masks = F.interpolate(outputs.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.einsum("nqc,nqhw->nchw", classes, masks.sigmoid())


@contextlib.contextmanager
def _quiet_progress():
    """No transformers progress bars while saving/loading (they would mix into command output)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
