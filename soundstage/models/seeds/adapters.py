"""The adapters the seed methods add to transformers' Mask2Former, and their checkpoints' key layout.

bias_in_AVS and Stepping Stones ran Mask2Former through modified copies of transformers 4.30 / 4.35;
the changes are small modules added inside it. Here they are added to an unchanged transformers
model as submodules plus forward hooks (no copy of its code):

- Swin adapters (``add_swin_adapters``): a residual bottleneck ``Linear(d, d/4)–ReLU–Linear(d/4, d)``
  on each block's attention output (``swin_adapt_1``, after the output projection) and MLP output
  (``swin_adapt_3``, after the second linear layer): ``y + adapter(y)``.
- Replacing adapters (``add_replacing_adapters``): the same bottleneck, **without** residual, on the
  output of the pixel decoder's deformable attention (after ``output_proj``) and of the masked-attention
  decoder's self-attention (after ``out_proj``): ``adapter(y)``. ``skip_projection=True`` (Stepping
  Stones stage 1) feeds the adapter the projection's input instead: the projection is skipped, its
  weights stay in the state dict.

``legacy_state_dict`` maps a state dict of those copies (transformers 4.3x key layout, e.g.
``encoder.encoder.layers.0.blocks.0.attention.self.query``) onto the installed transformers' layout
(``encoder.swin.encoder.layers.0.blocks.0.attention.q_proj``); adapters included. Dropout sits after
the adapter in 4.3x and before it here: the same in evaluation and with the seed configs' dropout 0.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerAttention,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
)
from transformers.models.swin.modeling_swin import SwinAttention, SwinMLP


def bottleneck(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim))


def _residual(adapter_owner, name):
    def hook(module, args, output):
        return output + getattr(adapter_owner, name)(output)

    return hook


def _replacing(adapter_owner, skip_projection: bool):
    def hook(module, args, output):
        return adapter_owner.avs_adapt(args[0] if skip_projection else output)

    return hook


def add_swin_adapters(backbone: nn.Module) -> None:
    """Adds ``swin_adapt_1`` (on each block's ``attention``) and ``swin_adapt_3`` (on its ``mlp``)."""
    for module in list(backbone.modules()):
        if isinstance(module, SwinAttention):
            module.swin_adapt_1 = bottleneck(module.o_proj.out_features)
            module.o_proj.register_forward_hook(_residual(module, "swin_adapt_1"))
        elif isinstance(module, SwinMLP):
            module.swin_adapt_3 = bottleneck(module.fc2.out_features)
            module.fc2.register_forward_hook(_residual(module, "swin_adapt_3"))


def add_replacing_adapters(mask2former: nn.Module, skip_projection: bool = False) -> None:
    """Adds ``avs_adapt`` to every deformable attention of the pixel decoder and every
    self-attention of the masked-attention decoder (``mask2former``: any module holding them)."""
    for module in list(mask2former.modules()):
        if isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            projection = module.output_proj
        elif isinstance(module, Mask2FormerAttention):
            projection = module.out_proj
        else:
            continue
        module.avs_adapt = bottleneck(projection.out_features)
        projection.register_forward_hook(_replacing(module, skip_projection))


#: transformers 4.3x Swin keys (inside Mask2Former's ``pixel_level_module.encoder``) -> today's
LEGACY_SWIN_KEYS = (
    (r"pixel_level_module\.encoder\.(embeddings|encoder)\.", r"pixel_level_module.encoder.swin.\1."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.attention\.output\.swin_adapt_1\.", ".attention.swin_adapt_1."),
    (r"(blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"(blocks\.\d+)\.output\.swin_adapt_3\.", r"\1.mlp.swin_adapt_3."),
)
#: buffers of 4.3x that today's transformers recomputes from the config (not in its state dict)
LEGACY_DROPPED = (r"\.attention\.self\.relative_position_index$",)


def legacy_state_dict(state: dict, prefixes: dict) -> dict:
    """``state`` in a seed's layout -> ours: ``prefixes`` maps their top-level prefixes to ours
    (e.g. ``{"model_v.": "mask2former."}``); keys under no prefix stay as they are."""
    out = {}
    for key, value in state.items():
        if any(re.search(p, key) for p in LEGACY_DROPPED):
            continue
        for theirs, ours in prefixes.items():
            if key.startswith(theirs):
                key = ours + key[len(theirs) :]
                for pattern, replacement in LEGACY_SWIN_KEYS:
                    key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out
