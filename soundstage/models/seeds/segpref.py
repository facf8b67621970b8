"""SegPref (ECCV 2024, "Can Textual Semantics Mitigate Sounding Object Segmentation Preference?",
GeWu-Lab/Sounding-Object-Segmentation-Preference): text cues steer the audio prompt of Mask2Former.

What their code computes (``SegPref/models/avs_model.py::AVS_Model_Base`` with
``models/local/mask2former/`` on pip transformers 4.30.2), built around an unchanged transformers
``Mask2FormerForUniversalSegmentation`` (hooks and added submodules):

- Audio: the frame's VGGish vector (towhee's, signed) repeated 4 times, ``audio_proj`` ``128 -> 2048
  -> ReLU -> 1024``: 4 identical audio tokens per frame. Text: the frame's 4 ImageBind text features
  ``[4, 1024]`` through ``text_proj`` ``1024 -> 2048 -> ReLU -> 1024``.
- ``ca``: a gated cross-attention block (``GatedCrossAttention``: 4 heads, no LayerNorm, no dropout)
  where the 4 text tokens attend to the audio tokens: ``target + σ(β_attn)·out_projection(attention)
  + σ(β_pool)·mean(source)``; then ``prompt_proj`` ``1024 -> 2048 -> ReLU -> 256``: 4 prompt tokens.
- Inside the transformer module the learned query features (``queries_features``) attend to the
  frame's prompt tokens through a second such block (``ref_avs_attn``, width 256) and the result
  replaces the decoder's input queries.
- Replacing ``avs_adapt`` adapters after each pixel-decoder deformable attention's ``output_proj``
  (no residual); no Swin adapters, no decoder adapters.
- Post-processing (``foreground``): softmax over two class logits only (class 0 and no-object), the
  first kept; mask logits resized bilinearly to 384 and used **raw** (no sigmoid); summed over
  queries; bilinear to 256×256. Loss: BCE-with-logits on that map (their evaluation computes it too);
  their metric binarises ``sigmoid > 0.4``.
- Their model also holds three ``MultiheadAttention(1024, 8)`` (``mha_A_T``, ``mha_V_T``,
  ``mha_mm``) that are never called: not built here; ``key_map`` drops their weights. Their class
  head is the ADE one (150 classes) and only class 0 and no-object are read.

Module names follow theirs: ``model_v.…`` (the transformers model), ``audio_proj``, ``text_proj``,
``prompt_proj``, ``ca``; their checkpoints map onto ours by the Swin renames of
``adapters.legacy_state_dict`` and dropping the unused attention layers.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from soundstage.models.seeds.adapters import add_replacing_adapters, legacy_state_dict
from soundstage.models.seeds.base import SeedModel, load_seed_state, reference_mask2former

AUDIO_TOKENS = 4  # their cfgs.num_a
WIDTH, HIDDEN = 1024, 2048  # audio/text token width (ImageBind's), the projections' hidden width
PROCESSED_SIZE = 384
OUTPUT_SIZE = 256
KEY_PREFIXES = {"model_v.": "model_v."}
UNUSED_LAYERS = r"^(mha_A_T|mha_V_T|mha_mm)\."  # their never-called MultiheadAttention layers


def mlp(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, width_out))


class GatedCrossAttention(nn.Module):
    """Their ``REF_AVS_Transformer``: ``target [Lt, N, D]`` attends to ``source [N, Ls, D]``;
    returns ``target + σ(β_attn)·out_projection(attention) + σ(β_pool)·mean_s(source)``."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 4):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.query_embedding = nn.Linear(embed_dim, embed_dim)
        self.key_embedding = nn.Linear(embed_dim, embed_dim)
        self.value_embedding = nn.Linear(embed_dim, embed_dim)
        self.out_projection = nn.Linear(embed_dim, embed_dim)
        self.beta_source_pool = nn.Parameter(torch.ones(1))
        self.beta_source_attn = nn.Parameter(torch.ones(1))

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        length, batch, _ = target.shape

        def heads(x):  # [N, L, D] -> [N, heads, L, head_dim]
            return x.view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.query_embedding(target.transpose(0, 1)))
        k, v = heads(self.key_embedding(source)), heads(self.value_embedding(source))
        weights = (q @ k.transpose(-2, -1) * self.scaling).softmax(-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, self.embed_dim)
        out = torch.sigmoid(self.beta_source_attn) * self.out_projection(attended)
        pooled = torch.sigmoid(self.beta_source_pool) * source.mean(dim=1)
        return target + out.transpose(0, 1) + pooled[None]


class SegPref(SeedModel):
    """``model_v`` (transformers Mask2Former with ``avs_adapt`` and ``ref_avs_attn``) + the audio, text
    and prompt projections and the text→audio block ``ca``."""

    FILE_STEM, MASK2FORMER = "segpref", "model_v"

    def __init__(self, mask2former, audio_dim: int = 128, text_dim: int = WIDTH):
        super().__init__()
        add_replacing_adapters(mask2former.model.pixel_level_module, skip_projection=False)
        transformer = mask2former.model.transformer_module
        transformer.ref_avs_attn = GatedCrossAttention(mask2former.config.hidden_dim)
        self.model_v = mask2former
        self.audio_proj = mlp(audio_dim, WIDTH)
        self.text_proj = mlp(text_dim, WIDTH)
        self.prompt_proj = mlp(WIDTH, mask2former.config.hidden_dim)
        self.ca = GatedCrossAttention(WIDTH)
        self.settings = {"audio_dim": audio_dim, "text_dim": text_dim}
        self._prompts = None
        transformer.decoder.register_forward_pre_hook(self._attend_prompts, with_kwargs=True)

    @property
    def config(self):
        return self.model_v.config

    def _attend_prompts(self, module, args, kwargs):
        attention = self.model_v.model.transformer_module.ref_avs_attn
        kwargs["inputs_embeds"] = attention(kwargs["inputs_embeds"], self._prompts.to(kwargs["inputs_embeds"].dtype))
        return args, kwargs

    def prompts(self, audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``audio [N, D]``, ``text [N, 4, Dt]`` -> the 4 prompt tokens ``[N, 4, hidden]``."""
        tokens = self.audio_proj(audio.float()[:, None].expand(-1, AUDIO_TOKENS, -1))  # [N, 4, 1024]
        fused = self.ca(self.text_proj(text.float()).transpose(0, 1), tokens)  # [4, N, 1024]
        return self.prompt_proj(fused.transpose(0, 1))

    def forward(self, pixel_values, audio, text):
        """``pixel_values [N, 3, S, S]``, ``audio [N, D]``, ``text [N, 4, Dt]`` -> transformers'
        Mask2Former output (no loss: theirs is the BCE of ``foreground``)."""
        self._prompts = self.prompts(audio, text)
        try:
            return self.model_v(pixel_values=pixel_values)
        finally:
            self._prompts = None

    @staticmethod
    def foreground(outputs, size=(OUTPUT_SIZE, OUTPUT_SIZE), processed_size=(PROCESSED_SIZE, PROCESSED_SIZE)) -> torch.Tensor:
        """``[N, H, W]`` foreground logits (their ``post_process_semantic_segmentation`` with
        ``AVS_BINARY``; ``processed_size``: the model's input size)."""
        logits = outputs.class_queries_logits
        classes = torch.stack([logits[..., 0], logits[..., -1]], -1).softmax(-1)[..., :1]
        masks = F.interpolate(outputs.masks_queries_logits, size=tuple(processed_size), mode="bilinear", align_corners=False)
        segmentation = torch.einsum("nqc,nqhw->nchw", classes, masks)
        return F.interpolate(segmentation, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def bce_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Their loss: BCE-with-logits of the foreground map against the binary ground truth, mean."""
    return F.binary_cross_entropy_with_logits(pred, gt.float())


def key_map(state: dict) -> dict:
    """A state dict saved by their code (``model_v.model.…``, ``audio_proj.…``, ``mha_*.…``,
    transformers 4.30 Swin names) -> ours; ours passes unchanged."""
    if not any(re.match(UNUSED_LAYERS, k) or ".attention.self." in k for k in state):
        return state
    kept = {k: v for k, v in state.items() if not re.match(UNUSED_LAYERS, k)}
    return legacy_state_dict(kept, KEY_PREFIXES)


class SegPrefReference(SegPref):
    """The reference interface (``soundstage.train.recipes.load_reference``): one clip of T frames
    with the tensors their ``AVS_Model_Base.forward`` takes."""

    @torch.no_grad()
    def reference_forward(self, pixel_values, audio, text) -> dict:
        """``pixel_values [T,3,384,384]``, ``audio [T,128]``, ``text [T,4,1024]`` -> ``pred
        [T,256,256]``, ``class_queries_logits [T,Q,C+1]``, ``masks_queries_logits [T,Q,h,w]``."""
        outputs = self.forward(pixel_values, audio, text)
        return {
            "pred": self.foreground(outputs, processed_size=pixel_values.shape[-2:]),
            "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
        }

    def reference_loss(self, out: dict, gt: torch.Tensor) -> torch.Tensor:
        return bce_loss(out["pred"], gt)


def load_reference(state_dict: dict, mask2former_config: dict | None) -> SegPrefReference:
    """Their state dict (``model_v.…``, ``audio_proj.…``, ``text_proj.…``, ``prompt_proj.…``,
    ``ca.…``, ``mha_*.…``) in our model; every other key must be used and every tensor of ours
    present, except the Swin ``layernorm`` today's backbone has and never uses. ``mask2former_config``
    None: the real base model (its ADE head, as theirs) from a local folder or the Hugging Face cache."""
    state = key_map(state_dict)
    model = SegPrefReference(
        reference_mask2former(mask2former_config),
        audio_dim=state["audio_proj.0.weight"].shape[1],
        text_dim=state["text_proj.0.weight"].shape[1],
    )
    return load_seed_state(model, state, "SegPref")
