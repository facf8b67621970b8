"""bias_in_AVS (ACM MM 2024, GeWu-Lab/bias_in_AVS): audio priming with active queries and a DDPM debias.

What their code computes (``AVS/models/avs_m2f_base.py::PmpAVS`` with its modified transformers 4.30
copy; ``AVSS/models/avs_model.py`` for AVSS), built here around an unchanged transformers
``Mask2FormerForUniversalSegmentation`` (``soundstage.models.seeds.adapters``):

- Swin adapters (``swin_adapt_1`` / ``swin_adapt_3``, residual) and replacing ``avs_adapt`` adapters
  after the deformable attention's ``output_proj`` and the decoder self-attention's ``out_proj``; the
  decoder's ``layernorm_sc`` exists and is never used.
- Audio: VGGish ``[128] -> 512 -> ReLU -> hidden (256)`` per frame, repeated over the queries and
  multiplied per query by the frame's active-query weights (``active_weights``), added to the learned
  query features before the decoder.
- Debias, in training **and evaluation**: query 0's weighted audio is noised by a DDPM forward step
  (100 steps, betas linspace(1e-4, 0.02); t random in training, t = 99 at test), repeated over all
  queries (not re-weighted) for a second full pass; the prediction is ``2·clean − distorted``.
- AVS post-processing (``foreground``): class logits of the first 22 classes plus no-object, softmax,
  no-object dropped; mask logits resized bilinearly to the processed image size (384) and used **raw**
  (no sigmoid), times the active weights per query; foreground = sum over classes 1..21 of
  ``Σ_q p(c|q)·w_q·m_q``, resized to the image size, then bilinearly to 256×256. The loss is the focal
  loss (α 0.25, γ 2) on that map, mean over frames; the test binarises ``sigmoid > 0.4``.
- AVSS post-processing (``semantic``): the clean class logits (first 71 plus no-object, softmax without
  no-object) × sigmoid of the debiased mask logits ``2·clean − distorted`` at 384, summed over queries.

One frame is one image: a batch of N frames runs as one Mask2Former batch (their loop ran them one by
one; each frame's computation is independent of the others).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from soundstage.models.seeds.adapters import add_replacing_adapters, add_swin_adapters, legacy_state_dict
from soundstage.models.seeds.base import SeedModel, legacy_matcher, load_seed_state, reference_mask2former

ACTIVE_CLAMP = 1e-6
DDPM_STEPS, DDPM_BETAS = 100, (1e-4, 0.02)
AVS_CLASSES = 22  # AVS: classes 0..21 (background + 21) kept from the ADE head, as their processor does
AVSS_CLASSES = 71
PROCESSED_SIZE = 384  # their image processor's output size (mask logits are resized to it)
OUTPUT_SIZE = 256  # AVS prediction / ground-truth size
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
#: their checkpoint's top-level prefixes -> ours
KEY_PREFIXES = {"model_v.": "mask2former."}
UNUSED_THEIRS = ("model_v.criterion.mtl_loss.",)


def active_weights(ids, num_queries: int = 100):
    """Per frame: query ids -> weights over the queries, as their ``one_hot_encoding``: a single id
    gives a one-hot at index **0** whatever the id; otherwise ``eye(Q)[ids].sum(0)`` (duplicates
    add); then clamped to [1e-6, 1 − 1e-6]. ``ids``: a list of 1-D integer tensors, or an array
    ``[T, k]`` padded with -1 (-> numpy float32 ``[T, Q]``)."""
    padded = not isinstance(ids, (list, tuple))
    rows = [np.asarray(r).reshape(-1) for r in ids]
    rows = [r[r >= 0] for r in rows] if padded else rows
    out = np.zeros((len(rows), num_queries), dtype=np.float32)
    for i, r in enumerate(rows):
        if len(r) == 1:
            out[i, 0] = 1.0
        else:
            np.add.at(out[i], r.astype(np.int64), 1.0)
    out = np.clip(out, ACTIVE_CLAMP, 1 - ACTIVE_CLAMP)
    return out if padded else torch.from_numpy(out)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Their ``FocalLoss``: α·(1 − p_t)^γ·BCE, mean over pixels of each frame, then over frames."""
    bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    per_pixel = FOCAL_ALPHA * (1 - torch.exp(-bce)) ** FOCAL_GAMMA * bce
    return per_pixel.flatten(1).mean(1).mean()


class BiasInAVS(SeedModel):
    """``mask2former`` (transformers, with the adapters) + ``audio_proj``; ``head``: ``avs`` (binary
    foreground, focal loss) or ``avss`` (semantic classes, Mask2Former loss)."""

    FILE_STEM, MASK2FORMER = "bias_in_avs", "mask2former"

    def __init__(self, mask2former, audio_dim: int = 128, head: str = "avs", num_classes: int | None = None):
        super().__init__()
        add_swin_adapters(mask2former.model.pixel_level_module.encoder)
        add_replacing_adapters(mask2former.model)
        legacy_matcher(mask2former)  # their transformers 4.30's matching (AVSS loss)
        hidden = mask2former.config.hidden_dim
        mask2former.model.transformer_module.decoder.layernorm_sc = nn.LayerNorm(hidden)  # in their model, unused
        self.mask2former = mask2former
        self.audio_proj = nn.Sequential(nn.Linear(audio_dim, 512), nn.ReLU(), nn.Linear(512, hidden))
        self.head = head
        self.num_classes = num_classes or (AVS_CLASSES if head == "avs" else AVSS_CLASSES)
        self.settings = {"audio_dim": audio_dim, "head": head, "num_classes": self.num_classes}
        betas = torch.linspace(*DDPM_BETAS, DDPM_STEPS, dtype=torch.float64).float()
        self.register_buffer("alpha_bars", torch.cumprod(1 - betas, 0), persistent=False)
        self._prompt = None
        mask2former.model.transformer_module.decoder.register_forward_pre_hook(self._add_prompt, with_kwargs=True)

    @property
    def config(self):
        return self.mask2former.config

    def _add_prompt(self, module, args, kwargs):
        if self._prompt is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + self._prompt.to(kwargs["inputs_embeds"].dtype)
        return args, kwargs

    def _pass(self, pixel_values, prompt, **targets):
        """One Mask2Former pass with ``prompt [Q, N, hidden]`` added to the query features."""
        self._prompt = prompt
        try:
            return self.mask2former(pixel_values=pixel_values, **targets)
        finally:
            self._prompt = None

    def distorted_prompt(self, prompt: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """DDPM forward step of query 0's prompt ``[N, hidden]``, repeated over the queries."""
        alpha_bar = self.alpha_bars[torch.as_tensor(t, device=self.alpha_bars.device)]
        alpha_bar = alpha_bar.reshape(-1, 1) if alpha_bar.dim() else alpha_bar
        noised = noise * torch.sqrt(1 - alpha_bar) + torch.sqrt(alpha_bar) * prompt[0]
        return noised[None].expand(prompt.shape[0], -1, -1)

    def forward(self, pixel_values, audio, active, noise=None, t=None, image_size=None, labels=None):
        """``pixel_values [N,3,S,S]``, ``audio [N,D]``, ``active [N,Q]`` (``active_weights``),
        ``noise [N,hidden]`` (the DDPM ε; default drawn), ``t`` (int or ``[N]``; default 99 in eval,
        random per call in training), ``image_size [N,2]`` (each frame's original (H, W); default the
        input size), ``labels``: ``[N,256,256]`` foreground (avs) or the Mask2Former targets
        ``(mask_labels, class_labels)`` (avss). Returns a dict: ``pred``, ``class_queries_logits
        [N,2,Q,C+1]`` and ``masks_queries_logits [N,2,Q,h,w]`` (clean, distorted), ``loss`` with labels."""
        audio = self.audio_proj(audio.float())  # [N, hidden]
        weights = active.to(audio.dtype)
        prompt = weights.transpose(0, 1)[..., None] * audio[None]  # [Q, N, hidden]
        if noise is None:
            noise = torch.randn_like(prompt[0])
        if t is None:
            t = int(torch.randint(0, DDPM_STEPS, ())) if self.training else DDPM_STEPS - 1
        targets = {}
        if labels is not None and self.head == "avss":
            targets = {"mask_labels": labels[0], "class_labels": labels[1]}
        clean = self._pass(pixel_values, prompt, **targets)
        distorted = self._pass(pixel_values, self.distorted_prompt(prompt, noise, t))
        out = {
            "class_queries_logits": torch.stack([clean.class_queries_logits, distorted.class_queries_logits], 1),
            "masks_queries_logits": torch.stack([clean.masks_queries_logits, distorted.masks_queries_logits], 1),
        }
        if self.head == "avs":
            size = pixel_values.shape[-2:]
            pred = 2 * self.foreground(clean, weights, size, image_size) - self.foreground(distorted, weights, size, image_size)
            out["pred"] = pred
            if labels is not None:
                out["loss"] = focal_loss(pred, labels)
        else:
            out["pred"] = self.semantic(clean, distorted, pixel_values.shape[-2:])
            if labels is not None:
                out["loss"] = self.semantic_loss(clean, distorted, weights, *labels)
        return out

    def foreground(self, outputs, weights, processed_size, image_size=None) -> torch.Tensor:
        """``[N, 256, 256]`` foreground logits of one pass (the AVS post-processing)."""
        logits = outputs.class_queries_logits
        classes = torch.cat([logits[..., : self.num_classes], logits[..., -1:]], -1).softmax(-1)[..., :-1]
        masks = F.interpolate(outputs.masks_queries_logits, size=tuple(processed_size), mode="bilinear", align_corners=False)
        masks = masks * weights[..., None, None]
        foreground = torch.einsum("nqc,nqhw->nchw", classes, masks)[:, 1:].sum(1, keepdim=True)
        frames = []
        for i in range(len(foreground)):
            size = tuple(int(v) for v in image_size[i]) if image_size is not None else tuple(processed_size)
            frame = F.interpolate(foreground[i : i + 1], size=size, mode="bilinear", align_corners=False)
            frames.append(F.interpolate(frame, size=(OUTPUT_SIZE, OUTPUT_SIZE), mode="bilinear", align_corners=False))
        return torch.cat(frames)[:, 0]

    def semantic(self, clean, distorted, processed_size) -> torch.Tensor:
        """``[N, C, S, S]`` class scores (the AVSS post-processing, before resizing and argmax)."""
        logits = clean.class_queries_logits
        classes = torch.cat([logits[..., : self.num_classes], logits[..., -1:]], -1).softmax(-1)[..., :-1]
        masks = 2 * clean.masks_queries_logits - distorted.masks_queries_logits
        masks = F.interpolate(masks, size=tuple(processed_size), mode="bilinear", align_corners=False).sigmoid()
        return torch.einsum("nqc,nqhw->nchw", classes, masks)

    def semantic_loss(self, clean, distorted, weights, mask_labels, class_labels) -> torch.Tensor:
        """AVSS: the clean pass's Mask2Former loss + 10 × the unweighted sum of the mask, dice and
        class losses of the debiased logits (``2·clean − distorted``), queries matched on the
        debiased mask logits times the active weights."""
        masks = 2 * clean.masks_queries_logits - distorted.masks_queries_logits
        classes = 2 * clean.class_queries_logits - distorted.class_queries_logits
        criterion = self.mask2former.criterion
        matched_on = weights[..., None, None] * masks
        indices = criterion.matcher(matched_on, classes, mask_labels, class_labels)
        num_masks = criterion.get_num_masks(class_labels, device=masks.device)
        losses = {
            **criterion.loss_masks(masks, mask_labels, indices, num_masks),
            **criterion.loss_labels(classes, class_labels, indices),
        }
        return clean.loss + 10 * sum(losses.values())


def key_map(state: dict) -> dict:
    """A state dict saved by their code (``model_v.model.…``, ``audio_proj.…``) -> ours; ours passes.
    Their AVSS criterion's ``mtl_loss.params`` (an uncertainty weighting their loss never applies:
    ``multitask = False``) is left out."""
    if not any(k.startswith("model_v.") for k in state):
        return state
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_THEIRS)}
    return legacy_state_dict(state, KEY_PREFIXES)


class BiasInAVSReference(BiasInAVS):
    """The reference interface (``soundstage.train.recipes.load_reference``): one clip of T frames
    with the tensors their ``PmpAVS.forward`` takes."""

    @torch.no_grad()
    def reference_forward(self, pixel_values, audio, active_ids, image_size, noise, t) -> dict:
        """``pixel_values [T,3,384,384]``, ``audio [T,128]``, ``active_ids`` (T 1-D LongTensors),
        ``image_size (H, W)``, ``noise [T,hidden]``, ``t`` -> ``pred [T,256,256]`` (AVSS: the class map
        ``[T,H,W]``, with ``scores [T,C,384,384]``), ``class_queries_logits [T,2,Q,C+1]``,
        ``masks_queries_logits [T,2,Q,h,w]``."""
        weights = active_weights(list(active_ids), self.config.num_queries)
        sizes = torch.tensor([list(image_size)] * len(pixel_values))
        out = self.forward(pixel_values, audio, weights, noise=noise, t=t, image_size=sizes)
        if self.head == "avss":  # their semantic map: the scores resized to the image, argmax over classes
            out["scores"] = out["pred"]
            out["pred"] = F.interpolate(out["scores"], size=tuple(image_size), mode="bilinear", align_corners=False).argmax(1)
        return out

    def reference_loss(self, out: dict, gt: torch.Tensor) -> torch.Tensor:
        return focal_loss(out["pred"], gt)


def load_reference(state_dict: dict, mask2former_config: dict | None, head: str = "avs") -> BiasInAVSReference:
    """Their state dict (``model_v.…``, ``audio_proj.…``) in our model; every key must be used and
    every tensor of ours present, except the Swin ``layernorm`` today's backbone has and never uses."""
    state = key_map(state_dict)
    mask2former = reference_mask2former(mask2former_config)
    audio_dim = state["audio_proj.0.weight"].shape[1]
    return load_seed_state(BiasInAVSReference(mask2former, audio_dim=audio_dim, head=head), state, "bias_in_AVS")
