"""HuBERT features with the semantics of fairseq's ``dump_hubert_feature.py``, without fairseq.

``load_hubert(source)`` takes a Hugging Face hub id or local directory (transformers
``HubertModel``) or an original fairseq HuBERT checkpoint ``.pt``. A fairseq checkpoint is a
pickle holding more than tensors (``argparse.Namespace``, ``fairseq.data.dictionary.Dictionary``),
so ``torch.load(weights_only=True)`` refuses it and fairseq itself no longer imports on current
Python. We read it with a restricted unpickler that admits only the globals such a file needs
(tensor rebuilding, ``OrderedDict``, ``Namespace``, numpy scalars, and inert stand-ins for the
fairseq classes), map its config onto ``transformers.HubertConfig`` and its weights onto
transformers' key names.

What fairseq's feature dump does, and the extractor therefore does:

- waveform: float in [-1, 1], 16 kHz mono; when the checkpoint's task config says
  ``normalize`` (large/xlarge models), ``layer_norm`` over the whole waveform (eps 1e-5) once,
  before chunking;
- inference on consecutive, non-overlapping chunks of 1,600,000 samples (100 s), outputs
  concatenated along time;
- ``layer`` L (1-based) is the output of transformer block L and nothing more: for
  layer-norm-first models the encoder's final layer norm is NOT applied, even for the last
  block (fairseq only applies it when no output layer is requested);
- frames at 50 Hz: ``(n - 400) // 320 + 1`` per chunk for the standard conv stack.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from transformers import HubertConfig, HubertModel

from soundstage.device import torch_dtype
from soundstage.models.safe_pickle import numpy_data_globals, restricted_pickle_module
from soundstage.pipeline.identity import model_source

SAMPLE_RATE = 16000
#: fairseq's ``--max_chunk``: samples per forward pass (100 s at 16 kHz)
MAX_CHUNK = 1_600_000
#: fairseq's waveform layer_norm eps (``F.layer_norm`` default)
WAVE_NORM_EPS = 1e-5

# ---------------------------------------------------------------------------------- extractor


class HubertExtractor:
    """A loaded HuBERT model that returns one layer's features the way fairseq dumps them."""

    def __init__(self, model, normalize: bool, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.model = model.eval().to(device=self.device, dtype=self.dtype)
        self.normalize = bool(normalize)
        config = model.config
        self.num_layers = int(config.num_hidden_layers)
        self.dim = int(config.hidden_size)
        self.layer_norm_first = bool(config.do_stable_layer_norm)
        self.conv = list(zip(config.conv_kernel, config.conv_stride))

    # --- shapes

    @property
    def min_samples(self) -> int:
        """The receptive field of one frame (400 samples for the standard conv stack)."""
        samples = 1
        for kernel, stride in reversed(self.conv):
            samples = (samples - 1) * stride + kernel
        return samples

    def chunk_frames(self, num_samples: int) -> int:
        """Frames the conv stack makes of one chunk: ``(n - 400) // 320 + 1`` for the standard one."""
        n = num_samples
        for kernel, stride in self.conv:
            n = (n - kernel) // stride + 1
            if n <= 0:
                return 0
        return n

    def num_frames(self, num_samples: int) -> int:
        """Frames of a whole waveform, chunked as fairseq does."""
        return sum(self.chunk_frames(min(MAX_CHUNK, num_samples - start)) for start in range(0, num_samples, MAX_CHUNK))

    def check_layer(self, layer: int) -> int:
        layer = int(layer)
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers} (1-based, as fairseq), got {layer}")
        return layer

    # --- inference

    def extract(self, waveform, layer: int) -> np.ndarray:
        """Features ``[frames, dim]`` float32 of one 1-D 16 kHz waveform."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {wave.shape}")
        return self.extract_batch(wave[None], layer)[0]

    def extract_batch(self, waves, layer: int, out_dtype=np.float32) -> np.ndarray:
        """Features ``[B, frames, dim]`` of ``B`` waveforms of equal length (``[B, T]``).

        Each row is processed exactly as on its own: no padding, per-row normalisation.
        ``waves`` may be a numpy array or a (pinned) CPU tensor.
        """
        x = torch.as_tensor(waves)
        if x.ndim != 2:
            raise ValueError(f"expected waveforms [B, T], got shape {tuple(x.shape)}")
        layer = self.check_layer(layer)
        with torch.inference_mode():
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
            if self.normalize:  # once, over each whole waveform, before chunking (fairseq)
                x = F.layer_norm(x, x.shape[-1:], eps=WAVE_NORM_EPS)
            outputs = []
            with _first_blocks(self.model, layer, drop_final_norm=self.layer_norm_first):
                for start in range(0, x.shape[1], MAX_CHUNK):
                    chunk = x[:, start : start + MAX_CHUNK]
                    if chunk.shape[1] < self.min_samples:
                        # a trailing piece shorter than one frame's receptive field yields no frame
                        # (fairseq's conv stack would raise on it)
                        continue
                    outputs.append(self.model(chunk.to(self.dtype)).last_hidden_state)
            if not outputs:
                raise ValueError(f"waveform of {x.shape[1]} samples is shorter than one frame ({self.min_samples})")
            feats = torch.cat(outputs, dim=1)
            torch_out = {np.float32: torch.float32, np.float16: torch.float16}[np.dtype(out_dtype).type]
            return feats.to(torch_out).cpu().numpy()


@contextmanager
def _first_blocks(model, layer: int, drop_final_norm: bool):
    """Run only transformer blocks 1..layer; for layer-norm-first models skip the final norm.

    This is fairseq's ``output_layer``: it stops after block ``layer`` and returns its output
    as is. Swapping the module list (rather than collecting all hidden states) also saves the
    compute of the blocks above ``layer``.
    """
    encoder = model.encoder
    all_layers, final_norm = encoder.layers, encoder.layer_norm
    encoder.layers = all_layers[:layer]
    if drop_final_norm:
        # in layer-norm-first encoders ``layer_norm`` runs after the blocks; in the others it
        # runs before them (and fairseq applies it there too), so it stays
        encoder.layer_norm = torch.nn.Identity()
    try:
        yield
    finally:
        encoder.layers, encoder.layer_norm = all_layers, final_norm


# ------------------------------------------------------------------------------------ loading


def load_hubert(source, device="cpu", dtype=torch.float32, normalize: bool | None = None) -> HubertExtractor:
    """An extractor for a hub id / local transformers directory or a fairseq ``.pt`` checkpoint.

    ``normalize`` (waveform layer norm) defaults to what the checkpoint says: the fairseq task
    config's ``normalize``; for transformers models the ``do_normalize`` of a
    ``preprocessor_config.json`` beside the weights, else whether the conv stack uses layer
    norm (large-style models are trained on normalised waveforms, base ones are not — this is
    also how transformers' conversion script sets ``do_normalize``).
    """
    source = str(source)
    if os.path.isfile(source):
        model, ckpt_normalize = hubert_from_fairseq(source)
    else:
        model, ckpt_normalize = _hubert_from_transformers(model_source(source, "--model"))
    if normalize is None:
        normalize = ckpt_normalize
    return HubertExtractor(model, normalize=normalize, device=device, dtype=dtype)


def _hubert_from_transformers(source: str):
    model = HubertModel.from_pretrained(source)
    normalize = model.config.feat_extract_norm == "layer"
    preprocessor = os.path.join(source, "preprocessor_config.json")
    if not os.path.isdir(source):
        try:
            preprocessor = hf_hub_download(source, "preprocessor_config.json")
        except Exception:  # no such file in the repo, or offline: keep the rule above
            preprocessor = None
    if preprocessor and os.path.isfile(preprocessor):
        with open(preprocessor) as f:
            normalize = bool(json.load(f).get("do_normalize", normalize))
    return model, normalize


def hubert_from_fairseq(path: str):
    """``(transformers HubertModel, task normalize flag)`` from a fairseq HuBERT checkpoint."""
    ckpt = load_fairseq_checkpoint(path)
    model_cfg, task_cfg = fairseq_configs(ckpt)
    config = hubert_config_from_fairseq(model_cfg)
    model = HubertModel(config)
    state = hubert_state_dict_from_fairseq(ckpt["model"], model.state_dict().keys())
    model.load_state_dict(state, strict=True)
    return model, bool(task_cfg.get("normalize", False))


# --- the restricted unpickler


class FairseqDictionaryStandIn:
    """Inert stand-in for ``fairseq.data.dictionary.Dictionary`` (the label vocabulary of the
    pre-training task, pickled in ``task_state``): keeps the pickled attributes, runs no code."""


def _fairseq_choice_enum(value):
    """Stand-in for fairseq's ``ChoiceEnum`` members (pickled as ``Choices(value)``): the string."""
    return str(value)


def _allowed_globals() -> dict:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("fairseq.data.dictionary", "Dictionary"): FairseqDictionaryStandIn,
        ("fairseq.dataclass.constants", "Choices"): _fairseq_choice_enum,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    for name in dir(torch):  # dtypes are pickled as globals (torch.float32, ...)
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed.update(numpy_data_globals())  # numpy scalars in optimizer history and training meters
    return allowed


#: what ``torch.load(pickle_module=...)`` needs of a pickle module, admitting only the above
_restricted_pickle = restricted_pickle_module(_allowed_globals, "a fairseq HuBERT checkpoint")


def load_fairseq_checkpoint(path: str) -> dict:
    """The checkpoint dict, unpickled without fairseq and without running pickled code."""
    ckpt = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a fairseq checkpoint (expected a dict with 'model')")
    return ckpt


def fairseq_configs(ckpt: dict) -> tuple[dict, dict]:
    """``(model config, task config)`` as plain dicts.

    fairseq >= 0.10 stores ``cfg`` as a plain dict (``OmegaConf.to_container``) with ``model``
    and ``task`` sections; older checkpoints store one flat ``argparse.Namespace`` as ``args``.
    """
    cfg = ckpt.get("cfg")
    if cfg is not None:
        model_cfg, task_cfg = _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
    elif ckpt.get("args") is not None:
        model_cfg = task_cfg = _as_dict(ckpt["args"])
    else:
        raise ValueError("fairseq checkpoint has neither 'cfg' nor 'args'")
    if "w2v_args" in model_cfg or any(k.startswith("w2v_encoder.") for k in ckpt["model"]):
        raise ValueError("this is a fine-tuned (CTC) fairseq checkpoint; use the pre-trained HuBERT checkpoint")
    name = model_cfg.get("_name", model_cfg.get("arch", "hubert"))
    if "hubert" not in str(name):
        raise ValueError(f"not a HuBERT checkpoint (model {name!r})")
    return model_cfg, task_cfg


def _as_dict(value) -> dict:
    if value is None:
        return {}
    return dict(vars(value)) if isinstance(value, argparse.Namespace) else dict(value)


#: fairseq ``HubertConfig`` defaults for the fields we read (older checkpoints may omit some)
_FAIRSEQ_DEFAULTS = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "conv_pos_batch_norm": False,
    "pos_conv_depth": 1,
}


def hubert_config_from_fairseq(model_cfg: dict):
    """The transformers ``HubertConfig`` equivalent to a fairseq HuBERT model config."""
    cfg = {**_FAIRSEQ_DEFAULTS, **{k: v for k, v in model_cfg.items() if v is not None}}
    if cfg["layer_type"] != "transformer":
        raise ValueError(f"unsupported fairseq HuBERT layer_type {cfg['layer_type']!r} (only 'transformer')")
    if int(cfg["pos_conv_depth"]) != 1:
        raise ValueError("unsupported fairseq pos_conv_depth > 1")
    conv = parse_conv_layers(cfg["conv_feature_layers"])
    norm = {"default": "group", "layer_norm": "layer"}.get(cfg["extractor_mode"])
    if norm is None:
        raise ValueError(f"unknown fairseq extractor_mode {cfg['extractor_mode']!r}")
    return HubertConfig(
        hidden_size=int(cfg["encoder_embed_dim"]),
        num_hidden_layers=int(cfg["encoder_layers"]),
        num_attention_heads=int(cfg["encoder_attention_heads"]),
        intermediate_size=int(cfg["encoder_ffn_embed_dim"]),
        hidden_act=str(cfg["activation_fn"]),
        feat_extract_norm=norm,
        feat_extract_activation="gelu",  # fairseq's conv blocks use nn.GELU
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(cfg["conv_bias"]),
        num_conv_pos_embeddings=int(cfg["conv_pos"]),
        num_conv_pos_embedding_groups=int(cfg["conv_pos_groups"]),
        conv_pos_batch_norm=bool(cfg["conv_pos_batch_norm"]),
        do_stable_layer_norm=bool(cfg["layer_norm_first"]),
        feat_proj_layer_norm=True,  # fairseq HuBERT: layer_norm before post_extract_proj
        layer_norm_eps=1e-5,
        # inference only: every dropout off
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
    )


def parse_conv_layers(text: str) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"``.

    fairseq ``eval``s it; we only accept list/tuple literals of ints combined with ``+`` and
    ``*`` (nothing from a checkpoint is executed).
    """

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(n) for n in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported conv_feature_layers expression: {text!r}")

    layers = value(ast.parse(str(text), mode="eval"))
    if not layers or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"conv_feature_layers must be a list of (dim, kernel, stride): {text!r}")
    return [tuple(int(v) for v in t) for t in layers]


# fairseq key -> transformers key, for the parts that are renamed (prefix rewrites, in order)
_KEY_RENAMES = (
    ("post_extract_proj.", "feature_projection.projection."),
    ("layer_norm.", "feature_projection.layer_norm."),  # only the top-level one (checked by prefix)
    ("mask_emb", "masked_spec_embed"),
)
_LAYER_RENAMES = (
    ("self_attn.", "attention."),
    ("self_attn_layer_norm.", "layer_norm."),
    ("fc1.", "feed_forward.intermediate_dense."),
    ("fc2.", "feed_forward.output_dense."),
    ("final_layer_norm.", "final_layer_norm."),
)
#: old (``weight_g``) and new (``parametrizations``) names of weight norm's parameters, both ways
_WEIGHT_NORM_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}
#: pre-training heads, not part of the feature extractor
_DROPPED_PREFIXES = ("label_embs_concat", "final_proj.", "target_glu.")


def hubert_state_dict_from_fairseq(state: dict, target_keys) -> dict:
    """fairseq HuBERT weights renamed to transformers' ``HubertModel`` keys (the mapping transformers'
    own ``convert_hubert_original_pytorch_checkpoint_to_pytorch.py`` applies)."""
    target_keys = set(target_keys)
    out = {}
    for key, tensor in state.items():
        if key.startswith(_DROPPED_PREFIXES):
            continue
        new = _rename_key(key, target_keys)
        if new is None:
            raise ValueError(f"unexpected key in fairseq HuBERT checkpoint: {key}")
        out[new] = tensor
    if "feature_projection.projection.weight" in target_keys and "feature_projection.projection.weight" not in out:
        # fairseq has no post_extract_proj when conv dim == model dim; transformers always has one
        dim = out["feature_projection.layer_norm.weight"].shape[0]
        out["feature_projection.projection.weight"] = torch.eye(dim)
        out["feature_projection.projection.bias"] = torch.zeros(dim)
    return out


def _rename_key(key: str, target_keys: set) -> str | None:
    if key.startswith("feature_extractor.conv_layers."):
        # default mode: layer 0 = (Conv1d, Dropout, GroupNorm, GELU), others (Conv1d, Dropout, GELU);
        # layer_norm mode: (Conv1d, Dropout, (Transpose, LayerNorm, Transpose), GELU)
        parts = key.split(".")  # feature_extractor conv_layers i j [k] param
        i, j, param = parts[2], parts[3], parts[-1]
        module = "conv" if j == "0" else "layer_norm"
        new = f"feature_extractor.conv_layers.{i}.{module}.{param}"
    elif key.startswith("encoder.pos_conv."):
        parts = key.split(".")  # encoder pos_conv j param...
        j, param = parts[2], ".".join(parts[3:])
        if "encoder.pos_conv_embed.batch_norm.weight" in target_keys:  # (BatchNorm1d, Conv1d, SamePad, GELU)
            new = f"encoder.pos_conv_embed.{'batch_norm' if j == '0' else 'conv'}.{param}"
        else:  # (weight-normed Conv1d, SamePad, GELU); torch names weight norm's g and v two ways
            new = f"encoder.pos_conv_embed.conv.{param}"
            if new not in target_keys and param in _WEIGHT_NORM_NAMES:
                new = f"encoder.pos_conv_embed.conv.{_WEIGHT_NORM_NAMES[param]}"
    elif key.startswith("encoder.layers."):
        prefix, _, rest = key.partition(".layers.")
        index, _, rest = rest.partition(".")
        for old, repl in _LAYER_RENAMES:
            if rest.startswith(old):
                rest = repl + rest[len(old) :]
                break
        new = f"encoder.layers.{index}.{rest}"
    elif key.startswith("encoder.layer_norm."):
        new = key
    else:
        new = None
        for old, repl in _KEY_RENAMES:
            if key.startswith(old):
                new = repl + key[len(old) :]
                break
    return new if new in target_keys else None
