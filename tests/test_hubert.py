"""HuBERT loading and feature extraction against transformers, one clip at a time.

The reference for every check is an independent computation: transformers' own forward of the
same weights, with the output of block L taken by a forward hook (or ``hidden_states``), and the
waveform normalised in numpy where the model says so.
"""

import argparse
import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from soundstage.models import hubert as hubert_mod
from soundstage.models.hubert import load_hubert, parse_conv_layers
from soundstage.models.tiny import tiny_hubert_config

torch.set_num_threads(1)


def _tiny_model(layer_norm_first: bool, seed: int = 0):
    from transformers import HubertModel

    torch.manual_seed(seed)
    # three blocks, so that a middle layer (neither the first nor the last) is checked too
    model = HubertModel(tiny_hubert_config(layer_norm_first=layer_norm_first, num_hidden_layers=3)).eval()
    # random (non-identity) norms so that a skipped or extra layer norm shows up in the numbers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _waves(n: int, samples: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    waves = [0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.05 * rng.standard_normal(samples) + 0.02 * i for i in range(n)]
    return np.asarray(waves, dtype=np.float32)


def _reference(model, wave: np.ndarray, layer: int, normalize: bool) -> np.ndarray:
    """Output of block ``layer`` from transformers' full forward, via a hook (one clip)."""
    w = wave.astype(np.float64)
    if normalize:
        w = (w - w.mean()) / np.sqrt(w.var() + 1e-5)
    captured = {}

    def hook(_module, _inputs, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output

    handle = model.encoder.layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(torch.tensor(w, dtype=torch.float32)[None], output_hidden_states=True)
    finally:
        handle.remove()
    return captured["x"][0].numpy(), out


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_extract_equals_transformers_forward(tmp_path, layer_norm_first):
    model = _tiny_model(layer_norm_first)
    model.save_pretrained(tmp_path / "m")
    extractor = load_hubert(str(tmp_path / "m"))
    assert extractor.normalize == layer_norm_first  # large-style models are trained on normalised audio
    wave = _waves(1, 16000)[0]
    n_layers = model.config.num_hidden_layers
    for layer in range(1, n_layers + 1):
        feats = extractor.extract(wave, layer)
        ref, out = _reference(model, wave, layer, normalize=layer_norm_first)
        assert feats.dtype == np.float32
        assert feats.shape == ((16000 - 400) // 320 + 1, model.config.hidden_size)
        np.testing.assert_allclose(feats, ref, atol=2e-5, rtol=1e-4)
        if layer < n_layers:
            np.testing.assert_allclose(feats, out.hidden_states[layer][0].numpy(), atol=2e-5, rtol=1e-4)
    if layer_norm_first:
        # last block: fairseq's output_layer=N has no final encoder norm; transformers' output does
        last = out.last_hidden_state[0].numpy()
        assert np.abs(feats - last).max() > 0.1
        with torch.no_grad():
            renormed = model.encoder.layer_norm(torch.from_numpy(feats)).numpy()
        np.testing.assert_allclose(renormed, last, atol=2e-5, rtol=1e-4)
    else:
        np.testing.assert_allclose(feats, out.last_hidden_state[0].numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_batch_equals_one_at_a_time(tmp_path, layer_norm_first):
    model = _tiny_model(layer_norm_first, seed=3)
    model.save_pretrained(tmp_path / "m")
    extractor = load_hubert(str(tmp_path / "m"))
    waves = _waves(3, 12000)
    batched = extractor.extract_batch(waves, 2)
    assert batched.shape == (3, (12000 - 400) // 320 + 1, model.config.hidden_size)
    for i in range(3):
        np.testing.assert_allclose(batched[i], extractor.extract(waves[i], 2), atol=1e-5, rtol=1e-4)
        ref, _ = _reference(model, waves[i], 2, normalize=layer_norm_first)
        np.testing.assert_allclose(batched[i], ref, atol=2e-5, rtol=1e-4)


def test_chunking_normalises_once_then_splits(tmp_path, monkeypatch):
    """Long input: layer norm over the whole waveform, then independent 'max_chunk' pieces."""
    model = _tiny_model(True, seed=5)
    model.save_pretrained(tmp_path / "m")
    extractor = load_hubert(str(tmp_path / "m"))
    monkeypatch.setattr(hubert_mod, "MAX_CHUNK", 6400)
    wave = _waves(1, 6400 * 2 + 3000)[0]
    feats = extractor.extract(wave, 3)
    w = wave.astype(np.float64)
    normed = ((w - w.mean()) / np.sqrt(w.var() + 1e-5)).astype(np.float32)
    pieces = [normed[:6400], normed[6400:12800], normed[12800:]]
    refs = [_reference(model, p, 3, normalize=False)[0] for p in pieces]
    assert feats.shape[0] == sum((len(p) - 400) // 320 + 1 for p in pieces) == extractor.num_frames(len(wave))
    np.testing.assert_allclose(feats, np.concatenate(refs), atol=2e-5, rtol=1e-4)


def test_layer_out_of_range(tmp_path):
    model = _tiny_model(False)
    model.save_pretrained(tmp_path / "m")
    extractor = load_hubert(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="1..3"):
        extractor.extract(_waves(1, 4000)[0], 0)
    with pytest.raises(ValueError, match="1..3"):
        extractor.extract(_waves(1, 4000)[0], 4)


# ------------------------------------------------------------------- fairseq-format checkpoints


def _to_fairseq_keys(state: dict, layer_norm_conv: bool) -> collections.OrderedDict:
    """transformers HubertModel keys -> fairseq HubertModel keys, written out from fairseq's module tree."""
    out = collections.OrderedDict()
    layer_parts = {
        "attention": "self_attn",
        "layer_norm": "self_attn_layer_norm",
        "feed_forward.intermediate_dense": "fc1",
        "feed_forward.output_dense": "fc2",
        "final_layer_norm": "final_layer_norm",
    }
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("feature_extractor.conv_layers."):
            i, module, param = parts[2], parts[3], parts[4]
            if module == "conv":
                fkey = f"feature_extractor.conv_layers.{i}.0.{param}"
            elif layer_norm_conv:  # Sequential(TransposeLast, Fp32LayerNorm, TransposeLast) at index 2
                fkey = f"feature_extractor.conv_layers.{i}.2.1.{param}"
            else:  # Fp32GroupNorm at index 2 of the first block
                fkey = f"feature_extractor.conv_layers.{i}.2.{param}"
        elif key.startswith("feature_projection.projection."):
            fkey = "post_extract_proj." + parts[-1]
        elif key.startswith("feature_projection.layer_norm."):
            fkey = "layer_norm." + parts[-1]
        elif key == "masked_spec_embed":
            fkey = "mask_emb"
        elif key == "encoder.pos_conv_embed.conv.parametrizations.weight.original0":
            fkey = "encoder.pos_conv.0.weight_g"
        elif key == "encoder.pos_conv_embed.conv.parametrizations.weight.original1":
            fkey = "encoder.pos_conv.0.weight_v"
        elif key == "encoder.pos_conv_embed.conv.bias":
            fkey = "encoder.pos_conv.0.bias"
        elif key.startswith("encoder.layers."):
            n, rest = parts[2], ".".join(parts[3:])
            for hf, fs in layer_parts.items():
                if rest.startswith(hf + "."):
                    rest = fs + rest[len(hf) :]
                    break
            else:
                raise AssertionError(key)
            fkey = f"encoder.layers.{n}.{rest}"
        elif key.startswith("encoder.layer_norm."):
            fkey = key
        else:
            raise AssertionError(f"test mapping misses {key}")
        out[fkey] = value.clone()
    return out


def _fake_fairseq_modules():
    """Modules named like fairseq's, so pickle records the same globals a real checkpoint has."""
    fairseq = types.ModuleType("fairseq")
    data = types.ModuleType("fairseq.data")
    dictionary = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:
        def __init__(self, symbols):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + list(symbols)
            self.count = [1] * len(self.symbols)
            self.indices = {s: i for i, s in enumerate(self.symbols)}
            self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
            self.nspecial = 4

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    dictionary.Dictionary = Dictionary
    fairseq.data, data.dictionary = data, dictionary
    return {"fairseq": fairseq, "fairseq.data": data, "fairseq.data.dictionary": dictionary}


def _write_fairseq_checkpoint(path, model, normalize: bool, style: str):
    cfg = model.config
    layer_norm_conv = cfg.feat_extract_norm == "layer"
    state = _to_fairseq_keys(model.state_dict(), layer_norm_conv)
    state["label_embs_concat"] = torch.randn(504, 16)  # pre-training heads: must be dropped
    state["final_proj.weight"] = torch.randn(16, cfg.hidden_size)
    state["final_proj.bias"] = torch.randn(16)
    conv = " + ".join(f"[({d},{k},{s})]" for d, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride))
    model_cfg = {
        "_name": "hubert",
        "label_rate": 50.0,
        "extractor_mode": "layer_norm" if layer_norm_conv else "default",
        "encoder_layers": cfg.num_hidden_layers,
        "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.intermediate_size,
        "encoder_attention_heads": cfg.num_attention_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.1,
        "dropout_features": 0.1,
        "final_dim": 16,
        "untie_final_proj": False,
        "layer_norm_first": bool(cfg.do_stable_layer_norm),
        "conv_feature_layers": conv,
        "conv_bias": bool(cfg.conv_bias),
        "logit_temp": 0.1,
        "target_glu": False,
        "feature_grad_mult": 0.1,
        "mask_length": 10,
        "mask_prob": 0.8,
        "conv_pos": cfg.num_conv_pos_embeddings,
        "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
        "latent_temp": [2.0, 0.5, 0.999995],
        "skip_masked": False,
        "skip_nomask": False,
        "required_seq_len_multiple": 2,
    }
    task_cfg = {
        "_name": "hubert_pretraining",
        "data": "/checkpoint/x/960h",
        "fine_tuning": False,
        "labels": ["km"],
        "label_dir": "/checkpoint/x/labels",
        "label_rate": 50.0,
        "sample_rate": 16000,
        "normalize": normalize,
        "enable_padding": False,
        "max_sample_size": 250000,
        "min_sample_size": 32000,
        "random_crop": True,
        "pad_audio": False,
    }
    fake = _fake_fairseq_modules()
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        dictionary = fake["fairseq.data.dictionary"].Dictionary([str(i) for i in range(500)])
        ckpt = {
            "args": None,
            "cfg": {"_name": None, "common": {"fp16": True, "seed": 1337}, "model": model_cfg, "task": task_cfg},
            "model": state,
            "criterion": None,
            "optimizer_history": [
                {
                    "criterion_name": "HubertCriterion",
                    "optimizer_name": "FairseqAdam",
                    "lr_scheduler_state": {"best": 3.25},
                    "num_updates": 400000,
                }
            ],
            "task_state": {"dictionaries": [dictionary]},
            "extra_state": {
                "metrics": {},
                "previous_training_time": 1234.5,
                "train_iterator": {"epoch": 290, "iterations_in_epoch": 0, "shuffle": True},
            },
            "last_optimizer_state": {
                "state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(7.0)}},
                "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "params": [0]}],
            },
        }
        if style == "args":  # fairseq < 0.10: one flat argparse.Namespace
            del ckpt["cfg"]
            ckpt["args"] = argparse.Namespace(arch="hubert", task="hubert_pretraining", **{**task_cfg, **model_cfg})
        torch.save(ckpt, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    with open(path, "rb") as f:  # the file really names fairseq's class
        assert b"fairseq.data.dictionary" in f.read()


@pytest.mark.parametrize("layer_norm_first,style", [(False, "cfg"), (True, "cfg"), (True, "args")])
def test_fairseq_checkpoint_loads_without_fairseq(tmp_path, layer_norm_first, style):
    assert "fairseq" not in sys.modules
    model = _tiny_model(layer_norm_first, seed=11)
    path = str(tmp_path / "hubert_tiny.pt")
    _write_fairseq_checkpoint(path, model, normalize=layer_norm_first, style=style)
    with pytest.raises(Exception):  # noqa: B017 (what a plain safe torch.load says about it varies with torch)
        torch.load(path, weights_only=True)

    extractor = load_hubert(path)
    assert "fairseq" not in sys.modules
    assert extractor.normalize == layer_norm_first  # from the task config
    assert extractor.layer_norm_first == layer_norm_first
    wave = _waves(1, 9600, seed=4)[0]
    for layer in (1, model.config.num_hidden_layers):
        ref, _ = _reference(model, wave, layer, normalize=layer_norm_first)
        np.testing.assert_allclose(extractor.extract(wave, layer), ref, atol=2e-5, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = str(tmp_path / "evil.pt")
    torch.save({"cfg": {"model": {}, "task": {}}, "model": {"x": torch.zeros(1)}, "extra": evil}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_hubert(path)
    assert not marker.exists()


def test_conv_layers_are_parsed_not_evaluated():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )
    with pytest.raises(ValueError):
        parse_conv_layers("__import__('os').system('true')")


# ------------------------------------------------------------------ the stage, through the runner


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    from soundstage.manifests.synth import make_synthetic_dataset

    # 5 s and 10 s clips at 16 / 44.1 / 48 kHz, mono and stereo
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), clips=6, seed=0, workers=1)


def test_hubert_stage_equals_one_clip_forward(synth_manifest, tmp_path):
    """Large-style model, last layer (no final norm), batched and one-by-one runs."""
    from soundstage.audio import load_audio
    from soundstage.cache import open_stage
    from soundstage.manifests.table import read_manifest, resolve_path
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    model = _tiny_model(True, seed=21)
    model.save_pretrained(tmp_path / "m")
    params = {"model": str(tmp_path / "m"), "layer": 3, "device": "cpu"}
    stage = get_stage("hubert")
    outputs = {}
    for batch_size in (4, 1):
        summary = run_stage(
            stage,
            synth_manifest,
            str(tmp_path / f"cache{batch_size}"),
            params,
            workers=0,
            batch_size=batch_size,
            progress=False,
            log=lambda *_: None,
        )
        assert summary.ok and summary.done == 6
        outputs[batch_size] = open_stage(summary.path)
    rows = read_manifest(synth_manifest).to_dict("records")
    lengths = set()
    for row in rows:
        wave = load_audio(resolve_path(row["audio_path"], os.path.dirname(synth_manifest))).wave
        lengths.add(len(wave))
        ref, _ = _reference(model, wave, 3, normalize=True)
        for _batch_size, reader in outputs.items():
            feats = reader[row["clip_id"]]["features"]
            assert feats.dtype == np.float16 and feats.shape == ref.shape
            np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert len(lengths) == 2 and len(rows) > len(lengths)  # equal-length clips really shared batches


def test_reduced_precision_stays_close(tmp_path):
    """--dtype bf16: the same features up to bf16 rounding (a wrong cast would be far off)."""
    model = _tiny_model(False, seed=8)
    model.save_pretrained(tmp_path / "m")
    wave = _waves(1, 8000, seed=9)[0]
    full = load_hubert(str(tmp_path / "m")).extract(wave, 3)
    low = load_hubert(str(tmp_path / "m"), dtype="bf16").extract(wave, 3)
    assert low.dtype == np.float32 and low.shape == full.shape
    assert np.linalg.norm(low - full) / np.linalg.norm(full) < 0.05
