"""BEATs (Chen et al., 2022) for inference, loading the official ``.pt`` checkpoints.

The official code (microsoft/unilm ``beats/``) needs torchaudio, which is tied to exact torch
versions; this is an independent implementation of the same computation with the same
parameter names, so ``load_state_dict(strict=True)`` takes the official ``model`` dict as is.

A checkpoint is ``{"cfg": dict, "model": state_dict, "label_dict": {index: AudioSet MID}}``
(``label_dict`` only in fine-tuned ones). The network:

    waveform -> Kaldi fbank [T, 128] -> Conv2d patches (16x16, time-major) -> LayerNorm
    -> Linear to the encoder width -> + GELU(weight-normed grouped conv) -> LayerNorm
    -> post-LN transformer layers (deep-norm residual scale, T5 relative position bias
       computed once and gated per query) -> [fine-tuned] Linear per patch, mean, sigmoid

Inference only: dropout, layer drop and gradient scaling of the original are training-time
and left out.
"""

from __future__ import annotations

import csv
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from soundstage.models.fbank import FBANK_MEAN, FBANK_STD, HOP, WINDOW, beats_fbank
from soundstage.models.safe_pickle import load_tensors

# Defaults of the original BEATsConfig; a checkpoint's ``cfg`` overrides them.
DEFAULT_CONFIG = {
    "input_patch_size": 16,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}


def min_samples(patch_size: int = 16) -> int:
    """Smallest input that yields one patch (``patch_size`` fbank frames)."""
    return WINDOW + (patch_size - 1) * HOP


class BEATsConfig:
    """Attribute view of the config dict (unknown keys are kept, as the original does)."""

    def __init__(self, cfg: dict | None = None):
        self.__dict__.update(DEFAULT_CONFIG)
        if cfg:
            self.__dict__.update(cfg)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _activation(name: str):
    if name == "gelu":  # the original evaluates GELU in float32 whatever the model dtype
        return lambda x: F.gelu(x.float()).type_as(x)
    if name == "gelu_accurate":
        return lambda x: F.gelu(x.float(), approximate="tanh").type_as(x)
    if name == "relu":
        return F.relu
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise ValueError(f"BEATs activation_fn {name!r} is not supported")


def downsample_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The original's reduction of a padding mask [B, N] to [B, length].

    It drops the trailing ``N % length`` entries, splits the rest into ``length`` equal runs
    and marks an output position padded when its whole run is. Applied twice (samples ->
    fbank frames -> patches); the second step ignores that patches are 8 per time step, which
    is the original behaviour and kept for identical numbers.
    """
    extra = padding_mask.size(1) % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.reshape(padding_mask.size(0), length, -1).all(-1)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight = g * v / ||v|| (norm over all axes but the kernel axis, as the
    original's ``weight_norm(dim=2)``); parameters named like torch's weight_norm."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        v = torch.randn(channels, channels // groups, kernel) * math.sqrt(4.0 / (kernel * channels))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class MultiheadAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding | None):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        if dim % heads:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
        self.num_heads, self.head_dim = heads, dim // heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if relative_attention_bias is not None:
            # one table shared by all layers; the original stores it under every layer's name
            self.relative_attention_bias = relative_attention_bias
        self.gru_rel_pos = bool(cfg.gru_rel_pos)
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def relative_buckets(self, length: int, device) -> torch.Tensor:
        """T5 bidirectional buckets [L, L] of key position minus query position (float32 logs
        in the same order as the original, so bucket boundaries agree)."""
        position = torch.arange(length, dtype=torch.long, device=device)
        relative = position[None, :] - position[:, None]
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        distance = relative.abs()
        max_exact = half // 2
        far = (
            max_exact
            + (
                torch.log(distance.clamp(min=1).float() / max_exact)
                / math.log(self.max_distance / max_exact)
                * (half - max_exact)
            ).long()
        )
        far = far.clamp(max=half - 1)
        return buckets + torch.where(distance < max_exact, distance, far)

    def position_bias(self, length: int) -> torch.Tensor:
        """[heads, L, L] relative position bias (computed once by the first layer)."""
        table = self.relative_attention_bias
        return table(self.relative_buckets(length, table.weight.device)).permute(2, 0, 1)

    def forward(self, x, key_padding_mask=None, position_bias=None):
        batch, length, dim = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)
            if self.gru_rel_pos:
                # per-query gate from the unscaled query: (a * (b * grep_a - 1) + 2)
                gate_a, gate_b = torch.sigmoid(self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1)).chunk(
                    2, dim=-1
                )
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        if key_padding_mask is not None:
            masked = torch.zeros(batch, 1, 1, length, dtype=q.dtype, device=q.device)
            masked = masked.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            bias = masked if bias is None else bias + masked
        if bias is not None:
            bias = bias.to(q.dtype)
        # softmax(q k^T / sqrt(d) + bias): the original's q / 32 then x 32 with a row-max
        # subtraction is the same function written to avoid fp16 overflow, which SDPA handles
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding | None):
        super().__init__()
        dim = cfg.encoder_embed_dim
        if cfg.activation_fn == "glu":
            raise ValueError("BEATs activation_fn 'glu' is not supported")
        self.self_attn = MultiheadAttention(cfg, relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _activation(cfg.activation_fn)
        self.layer_norm_first = bool(cfg.layer_norm_first)
        # deep norm scales the residual branch by (2 N)^(1/4) in post-LN layers
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x, padding_mask=None, position_bias=None):
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, padding_mask, position_bias))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(self.activation(self.fc1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups))
        # an even kernel with padding k // 2 yields one extra step, dropped as the original's SamePad
        self.pos_conv_trim = 1 if cfg.conv_pos % 2 == 0 else 0
        shared_bias = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) if cfg.relative_position_embedding else None
        self.relative_position_embedding = shared_bias is not None
        self.layers = nn.ModuleList(EncoderLayer(cfg, shared_bias) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = bool(cfg.layer_norm_first)

    def forward(self, x, padding_mask=None):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        conv = self.pos_conv(x.transpose(1, 2))
        if self.pos_conv_trim:
            conv = conv[:, :, : -self.pos_conv_trim]
        x = x + F.gelu(conv).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = None
        if self.relative_position_embedding:
            position_bias = self.layers[0].self_attn.position_bias(x.size(1))
        for layer in self.layers:
            x = layer(x, padding_mask, position_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig | dict):
        super().__init__()
        cfg = cfg if isinstance(cfg, BEATsConfig) else BEATsConfig(cfg)
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("BEATs config: deep_norm and layer_norm_first exclude each other")
        self.cfg = cfg
        self.patch_size = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(
            1, cfg.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = TransformerEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None
        self.label_dict: dict | None = None

    # -- loading and saving in the official format
    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> BEATs:
        """Load an official BEATs ``.pt`` (no pickled code: ``weights_only=True``)."""
        state = load_tensors(path, "an official BEATs checkpoint .pt", map_location)
        missing = [k for k in ("cfg", "model") if k not in state]
        if missing:
            raise ValueError(f"{path}: not a BEATs checkpoint (no {', '.join(missing)})")
        model = cls(BEATsConfig(state["cfg"]))
        model.load_state_dict(state["model"], strict=True)
        model.label_dict = state.get("label_dict")
        return model.eval()

    def save_checkpoint(self, path) -> None:
        """Write ``{"cfg", "model"[, "label_dict"]}`` as the official checkpoints are laid out."""
        state = {"cfg": self.cfg.to_dict(), "model": self.state_dict()}
        if self.label_dict is not None:
            state["label_dict"] = self.label_dict
        torch.save(state, path)

    @property
    def class_mids(self) -> list[str]:
        """AudioSet MID of each output column (from the checkpoint's ``label_dict``)."""
        if self.predictor is None or self.label_dict is None:
            raise ValueError("this BEATs checkpoint has no classifier labels (label_dict)")
        return [self.label_dict[i] for i in range(self.predictor.out_features)]

    @property
    def embed_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    # -- computation
    def preprocess(self, source: torch.Tensor, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD):
        """Normalised Kaldi fbank [B, frames, 128] of waveforms [B, samples] (float32)."""
        return beats_fbank(source, fbank_mean, fbank_std)

    def encode(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        fbank_mean: float = FBANK_MEAN,
        fbank_std: float = FBANK_STD,
    ):
        """Patch features [B, P, D] and the patch padding mask (None without a sample mask)."""
        if source.size(1) < min_samples(self.patch_size):
            raise ValueError(f"BEATs needs at least {min_samples(self.patch_size)} samples, got {source.size(1)}")
        dtype = self.patch_embedding.weight.dtype
        fbank = self.preprocess(source, fbank_mean, fbank_std)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, fbank.size(1))
        patches = self.patch_embedding(fbank.to(dtype).unsqueeze(1))  # [B, E, T/16, 128/16]
        features = self.layer_norm(patches.flatten(2).transpose(1, 2))  # time-major patch order
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, features.size(1))
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return self.encoder(features, padding_mask), padding_mask

    def classify(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities [B, C]: sigmoid of the per-patch logits averaged over valid patches."""
        logits = self.predictor(features)
        if padding_mask is not None and padding_mask.any():
            logits = logits.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            logits = logits.sum(dim=1) / (~padding_mask).sum(dim=1, keepdim=True)
        else:
            logits = logits.mean(dim=1)
        return torch.sigmoid(logits)

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        fbank_mean: float = FBANK_MEAN,
        fbank_std: float = FBANK_STD,
    ):
        """As the original: ``(probs [B, C], mask)`` if fine-tuned, else ``(features [B, P, D], mask)``."""
        features, padding_mask = self.encode(source, padding_mask, fbank_mean, fbank_std)
        if self.predictor is None:
            return features, padding_mask
        return self.classify(features, padding_mask), padding_mask


#: the AudioSet class list shipped with the package (index, mid, display_name; see ATTRIBUTION.md)
AUDIOSET_CLASS_LIST = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "audioset", "class_labels_indices.csv")


def audioset_classes() -> list[tuple[str, str]]:
    """(MID, display name) of the 527 AudioSet classes, in class-list order."""
    with open(AUDIOSET_CLASS_LIST, newline="", encoding="utf-8") as f:
        return [(row["mid"], row["display_name"]) for row in csv.DictReader(f)]
