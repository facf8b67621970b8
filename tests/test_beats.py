"""BEATs: official checkpoint format, numbers against a naive re-derivation, padding semantics."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soundstage.models.beats import AUDIOSET_CLASS_LIST as CLASS_LIST
from soundstage.models.beats import BEATs, downsample_padding_mask, min_samples
from soundstage.models.fbank import beats_fbank
from soundstage.models.tiny import tiny_beats_cfg

torch.set_num_threads(1)


def csv_mids() -> list:
    with open(CLASS_LIST, newline="", encoding="utf-8") as f:
        return [row["mid"] for row in csv.DictReader(f)]


def permuted_label_dict(classes: int) -> dict:
    """Column i -> MID of csv row 7 i mod 527: names must go through MIDs, not row order."""
    mids = csv_mids()
    return {i: mids[(7 * i) % len(mids)] for i in range(classes)}


def official_keys(cfg: dict) -> set:
    """State-dict names of the official implementation (microsoft/unilm beats/BEATs.py), written out by hand."""
    keys = {
        "patch_embedding.weight",
        "layer_norm.weight",
        "layer_norm.bias",
        "encoder.pos_conv.0.bias",
        "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv.0.weight_v",
        "encoder.layer_norm.weight",
        "encoder.layer_norm.bias",
    }
    if cfg["embed_dim"] != cfg["encoder_embed_dim"]:
        keys |= {"post_extract_proj.weight", "post_extract_proj.bias"}
    for n in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{n}."
        for lin in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"):
            keys |= {p + lin + ".weight", p + lin + ".bias"}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            keys |= {p + norm + ".weight", p + norm + ".bias"}
        if cfg["relative_position_embedding"]:
            keys.add(p + "self_attn.relative_attention_bias.weight")
        if cfg["gru_rel_pos"]:
            keys |= {p + "self_attn.grep_linear.weight", p + "self_attn.grep_linear.bias", p + "self_attn.grep_a"}
    if cfg["finetuned_model"]:
        keys |= {"predictor.weight", "predictor.bias"}
    return keys


def tiny_cfg(**overrides) -> dict:
    """The shipped tiny BEATs cfg with the full 527-class head of the AudioSet checkpoints."""
    return tiny_beats_cfg(**{"predictor_class": 527, **overrides})


def write_checkpoint(path, cfg, seed=0, label_dict=True):
    """A checkpoint as the official ones are laid out, from a plain dict of random tensors."""
    torch.manual_seed(seed)
    shapes = {k: v.shape for k, v in BEATs(cfg).state_dict().items()}
    assert set(shapes) == official_keys(cfg)
    state = {k: 0.3 * torch.randn(s) for k, s in shapes.items()}
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = 1 + 0.1 * torch.randn(shapes[k])
    if cfg["relative_position_embedding"]:  # one shared table, stored under every layer
        table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
        for k in state:
            if k.endswith("relative_attention_bias.weight"):
                state[k] = table
    ckpt = {"cfg": dict(cfg), "model": state}
    if label_dict and cfg["finetuned_model"]:
        ckpt["label_dict"] = permuted_label_dict(cfg["predictor_class"])
    torch.save(ckpt, path)
    return ckpt


def t5_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """T5 bidirectional relative-position bucket of one key-minus-query offset."""
    half = num_buckets // 2
    exact = half // 2
    n = abs(rel)
    if n < exact:
        offset = n
    else:
        offset = min(exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact)), half - 1)
    return (half if rel > 0 else 0) + offset


def naive_beats(ckpt, wave, padding_mask=None):
    """The BEATs forward pass re-derived from the official BEATs.py in the original's own formulation:
    time-first layout, q pre-scaled by 1/32 with a row-max subtraction, explicit softmax, the
    gate written out, per-element T5 buckets. Returns (output, patch mask)."""
    cfg, w = ckpt["cfg"], ckpt["model"]
    fbank = beats_fbank(wave)
    mask = padding_mask
    if mask is not None:
        mask = downsample_padding_mask(mask, fbank.size(1))
    x = F.conv2d(fbank.unsqueeze(1), w["patch_embedding.weight"], stride=cfg["input_patch_size"])
    x = x.reshape(x.size(0), x.size(1), -1).transpose(1, 2)
    x = F.layer_norm(x, x.shape[-1:], w["layer_norm.weight"], w["layer_norm.bias"])
    if mask is not None:
        mask = downsample_padding_mask(mask, x.size(1))
    if "post_extract_proj.weight" in w:
        x = F.linear(x, w["post_extract_proj.weight"], w["post_extract_proj.bias"])
    if mask is not None:
        x = x.clone()
        x[mask] = 0
    v, g = w["encoder.pos_conv.0.weight_v"], w["encoder.pos_conv.0.weight_g"]
    kernel = cfg["conv_pos"]
    weight = g * v / torch.sqrt((v**2).sum(dim=(0, 1), keepdim=True))
    conv = F.conv1d(x.transpose(1, 2), weight, w["encoder.pos_conv.0.bias"], padding=kernel // 2, groups=cfg["conv_pos_groups"])
    if kernel % 2 == 0:
        conv = conv[:, :, :-1]
    x = x + F.gelu(conv).transpose(1, 2)
    x = F.layer_norm(x, x.shape[-1:], w["encoder.layer_norm.weight"], w["encoder.layer_norm.bias"])
    x = x.transpose(0, 1)  # [T, B, D]
    T, B, D = x.shape
    H = cfg["encoder_attention_heads"]
    hd = D // H
    bucket = torch.tensor([[t5_bucket(j - i, cfg["num_buckets"], cfg["max_distance"]) for j in range(T)] for i in range(T)])
    alpha = math.pow(2 * cfg["encoder_layers"], 0.25)
    pos = w["encoder.layers.0.self_attn.relative_attention_bias.weight"][bucket].permute(2, 0, 1)  # [H, T, T]
    for n in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{n}."

        def lin(name, t):
            return F.linear(t, w[p + name + ".weight"], w[p + name + ".bias"])

        q_raw = lin("self_attn.q_proj", x)  # [T, B, D]
        q = q_raw * hd**-0.5 / 32
        k, val = lin("self_attn.k_proj", x), lin("self_attn.v_proj", x)
        heads = lambda t: t.reshape(T, B * H, hd).transpose(0, 1)  # noqa: E731
        s = torch.bmm(heads(q), heads(k).transpose(1, 2))
        s = (s - s.max(dim=-1, keepdim=True)[0]) * 32
        s = s.view(B, H, T, T)
        if mask is not None:
            s = s.masked_fill(mask[:, None, None, :], float("-inf"))
        gates = F.linear(
            heads(q_raw).view(B, H, T, hd), w[p + "self_attn.grep_linear.weight"], w[p + "self_attn.grep_linear.bias"]
        )
        gates = torch.sigmoid(gates.view(B, H, T, 2, 4).sum(-1))
        ga, gb = gates[..., :1], gates[..., 1:]
        s = s + (ga * (gb * w[p + "self_attn.grep_a"] - 1) + 2) * pos[None]
        attn = torch.bmm(torch.softmax(s, dim=-1).view(B * H, T, T), heads(val))
        attn = lin("self_attn.out_proj", attn.transpose(0, 1).reshape(T, B, D))
        x = F.layer_norm(x * alpha + attn, (D,), w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        y = lin("fc2", F.gelu(lin("fc1", x)))
        x = F.layer_norm(x * alpha + y, (D,), w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
    x = x.transpose(0, 1)
    if "predictor.weight" not in w:
        return x, mask
    logits = F.linear(x, w["predictor.weight"], w["predictor.bias"])
    if mask is not None and mask.any():
        logits = logits.masked_fill(mask[..., None], 0).sum(1) / (~mask).sum(1, keepdim=True)
    else:
        logits = logits.mean(1)
    return torch.sigmoid(logits), mask


def waves(batch=3, samples=16000 + 3217, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    out = 0.05 * torch.randn(batch, samples, generator=g)
    for i in range(batch):
        out[i] += 0.3 * torch.sin(2 * math.pi * (200 + 300 * i) * t)
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    path = tmp_path_factory.mktemp("beats") / "tiny_finetuned.pt"
    # few buckets so that ~50 patches reach the logarithmic and the clamped buckets
    return path, write_checkpoint(path, tiny_cfg(num_buckets=32, max_distance=40))


def test_relative_buckets_of_the_real_config():
    attn = BEATs(tiny_cfg(num_buckets=320, max_distance=800)).encoder.layers[0].self_attn
    buckets = attn.relative_buckets(1201, "cpu")
    expect_from_first = [t5_bucket(j, 320, 800) for j in range(1201)]
    expect_from_middle = [t5_bucket(j - 600, 320, 800) for j in range(1201)]
    assert buckets[0].tolist() == expect_from_first
    assert buckets[600].tolist() == expect_from_middle
    assert max(expect_from_first) == 319 and min(expect_from_middle) == 0


def test_official_checkpoint_round_trips_with_strict_keys(finetuned):
    path, ckpt = finetuned
    model = BEATs.from_checkpoint(path)
    assert model.label_dict == ckpt["label_dict"]
    assert model.class_mids[:2] == ["/m/09x0r", "/m/0brhx"]  # csv rows 0 and 7
    state = model.state_dict()
    assert set(state) == set(ckpt["model"])
    for k, v in ckpt["model"].items():
        assert torch.equal(state[k], v), k
    # the real iter3+ checkpoints describe this size; same code path, just not instantiated here
    real = tiny_cfg(
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        embed_dim=512,
        conv_pos=128,
        conv_pos_groups=16,
    )
    with torch.device("meta"):  # shapes only
        assert set(BEATs(real).state_dict()) == official_keys(real)


def test_strict_loading_rejects_foreign_keys_and_pickled_code(tmp_path, finetuned):
    _, ckpt = finetuned
    bad = dict(ckpt, model=dict(ckpt["model"], extra=torch.zeros(1)))
    torch.save(bad, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        BEATs.from_checkpoint(tmp_path / "extra.pt")
    torch.save(dict(ckpt, hook=np.random.default_rng), tmp_path / "code.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        BEATs.from_checkpoint(tmp_path / "code.pt")


def test_finetuned_outputs_equal_naive_rederivation(finetuned):
    path, ckpt = finetuned
    model = BEATs.from_checkpoint(path)
    x = waves()
    with torch.no_grad():
        probs, mask = model.extract_features(x)
        ref, _ = naive_beats(ckpt, x)
    assert probs.shape == (3, 527) and mask is None
    torch.testing.assert_close(probs, ref, atol=2e-5, rtol=0)
    assert probs.std() > 0.01  # not a saturated constant


def test_padded_batch_equals_naive_rederivation_and_original_mask_rule(finetuned):
    path, ckpt = finetuned
    model = BEATs.from_checkpoint(path)
    x = waves()
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[1, 12000:] = True
    mask[2, 5000:] = True
    x = x.masked_fill(mask, 0.0)
    with torch.no_grad():
        probs, patch_mask = model.extract_features(x, padding_mask=mask)
        ref, ref_mask = naive_beats(ckpt, x, mask)
        alone, _ = model.extract_features(x[:1])
    torch.testing.assert_close(probs, ref, atol=2e-5, rtol=0)
    assert torch.equal(patch_mask, ref_mask)
    # an unpadded row of a padded batch is unaffected by its neighbours
    torch.testing.assert_close(probs[:1], alone, atol=1e-5, rtol=0)
    # the original rule: samples -> frames in equal runs (tail dropped), then frames -> patches
    # the same way, a position padded when its whole run is
    frames = 1 + (x.size(1) - 400) // 160
    patches = (frames // 16) * 8
    run = x.size(1) // frames
    frame_pad = [[bool(mask[b, f * run : (f + 1) * run].all()) for f in range(frames)] for b in range(3)]
    prun = frames // patches
    expect = [[all(frame_pad[b][p * prun : (p + 1) * prun]) for p in range(patches)] for b in range(3)]
    assert patch_mask.tolist() == expect
    assert patch_mask[0].sum() == 0 and 0 < patch_mask[1].sum() < patch_mask[2].sum()


def test_pretrained_checkpoint_gives_patch_features(tmp_path):
    cfg = tiny_cfg(finetuned_model=False)
    ckpt = write_checkpoint(tmp_path / "pre.pt", cfg, seed=3)
    assert "label_dict" not in ckpt
    model = BEATs.from_checkpoint(tmp_path / "pre.pt")
    x = waves(batch=2, samples=8000)
    with torch.no_grad():
        feats, mask = model.extract_features(x)
        ref, _ = naive_beats(ckpt, x)
    frames = 1 + (8000 - 400) // 160
    assert feats.shape == (2, (frames // 16) * 8, 64) and mask is None
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="label_dict"):
        _ = model.class_mids


def test_too_short_input_is_an_error(finetuned):
    model = BEATs.from_checkpoint(finetuned[0])
    assert min_samples() == 400 + 15 * 160
    model.extract_features(torch.zeros(1, min_samples()))
    with pytest.raises(ValueError, match="at least 2800 samples"):
        model.extract_features(torch.zeros(1, min_samples() - 1))


def test_bfloat16_is_close_to_float32(finetuned):
    model = BEATs.from_checkpoint(finetuned[0])
    x = waves(batch=2)
    with torch.no_grad():
        full, _ = model.extract_features(x)
        half, _ = model.to(torch.bfloat16).extract_features(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0)


# ------------------------------------------------------------------------------- the stage


def test_audioset_class_list_is_the_527_row_original():
    import hashlib

    with open(CLASS_LIST, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == "cdd1049833c4b86127c2773ac0d14a2754b6a6d0d1798002ed5c66e699708429"
    with open(CLASS_LIST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 527 and [int(r["index"]) for r in rows] == list(range(527))
    assert rows[0]["display_name"] == "Speech" and rows[1]["display_name"] == "Male speech, man speaking"


def test_stage_setup_refuses_what_it_cannot_serve(tmp_path, finetuned):
    from soundstage.stages.beats import STAGE

    params = {"checkpoint": str(finetuned[0]), "device": "cpu", "dtype": "fp16"}
    with pytest.raises(ValueError, match="GPU"):
        STAGE.setup(params)
    write_checkpoint(tmp_path / "pre.pt", tiny_cfg(finetuned_model=False))
    with pytest.raises(ValueError, match="fine-tuned"):
        STAGE.setup(dict(params, checkpoint=str(tmp_path / "pre.pt"), dtype="fp32"))


def test_stage_batches_equal_one_at_a_time(finetuned):
    from soundstage.stages.beats import STAGE, batch_key

    model = STAGE.setup({"checkpoint": str(finetuned[0]), "device": "cpu", "dtype": "fp32"})
    items = [{"wave": w.numpy(), "seconds": 2} for w in waves(batch=3, samples=2 * 16000 + 4000, seed=5)]
    assert len({batch_key(i) for i in items}) == 1
    batched = STAGE.process(model, items, {})
    for item, out in zip(items, batched):
        alone = STAGE.process(model, [item], {})[0]
        for name in ("clip_probs", "second_probs", "second_embeddings"):
            np.testing.assert_allclose(out[name].astype(np.float32), alone[name].astype(np.float32), atol=2e-3)


def test_per_second_windows_line_up_with_frames(finetuned):
    """Each second holds a different sound; second i's outputs are the model run on exactly
    samples [16000 i, 16000 (i + 1)) alone; a short last second runs at its own length."""
    from soundstage.stages.beats import STAGE

    model = STAGE.setup({"checkpoint": str(finetuned[0]), "device": "cpu", "dtype": "fp32"})
    t = np.arange(16000) / 16000
    rng = np.random.default_rng(0)
    seconds = [
        0.5 * np.sin(2 * np.pi * 300 * t),
        0.3 * rng.standard_normal(16000),
        0.5 * np.sign(np.sin(2 * np.pi * 5 * t)) * np.sin(2 * np.pi * 2000 * t),
        0.4 * np.sin(2 * np.pi * 90 * t),
    ]
    wave = np.concatenate(seconds)[: 3 * 16000 + 9000].astype(np.float32)
    out = STAGE.process(model, [{"wave": wave, "seconds": 4}], {})[0]
    probs, embeddings = out["second_probs"], out["second_embeddings"]
    assert probs.shape == (4, 527) and embeddings.shape == (4, 64)
    with torch.no_grad():
        for i in range(4):
            window = torch.from_numpy(wave[16000 * i : 16000 * (i + 1)])[None]
            ref_probs, _ = model.extract_features(window)
            ref_feats, _ = model.encode(window)
            np.testing.assert_allclose(probs[i], ref_probs[0].numpy(), atol=1e-3)
            np.testing.assert_allclose(embeddings[i], ref_feats[0].mean(0).numpy(), atol=2e-3)
        whole, _ = model.extract_features(torch.from_numpy(wave)[None])
    np.testing.assert_allclose(out["clip_probs"], whole[0].numpy(), atol=1e-3)
    # the seconds really differ, so a misaligned window could not pass the checks above
    assert min(np.abs(embeddings[i] - embeddings[j]).max() for i in range(4) for j in range(i)) > 0.05


def test_load_counts_seconds_by_frames_and_refuses_short_audio(tmp_path):
    import soundfile as sf

    from soundstage.pipeline.stage import ClipError, LoadContext
    from soundstage.stages.beats import load

    ctx = LoadContext(params={}, upstream={}, manifest_dir=str(tmp_path))
    sf.write(tmp_path / "a.wav", np.zeros(16000 * 4 + 3000, np.float32), 16000)
    item = load({"audio_path": "a.wav", "num_frames": "5"}, ctx)
    assert item["seconds"] == 5 and len(item["wave"]) == 67000
    assert load({"audio_path": "a.wav", "num_frames": ""}, ctx)["seconds"] == 5
    assert load({"audio_path": "a.wav", "num_frames": "3"}, ctx)["seconds"] == 3
    sf.write(tmp_path / "b.wav", np.zeros(16000 * 4 + 1000, np.float32), 16000)
    assert load({"audio_path": "b.wav", "num_frames": ""}, ctx)["seconds"] == 4  # 1000 samples: no patch
    with pytest.raises(ClipError, match="does not cover 5 frames"):
        load({"audio_path": "b.wav", "num_frames": "5"}, ctx)
    with pytest.raises(ClipError, match="missing audio"):
        load({"audio_path": "nothere.wav", "num_frames": "5"}, ctx)


def test_stage_end_to_end_on_synthetic_dataset_and_tags(tmp_path, finetuned):
    from click.testing import CliRunner

    from soundstage.audio import load_audio
    from soundstage.cache import StageDir, open_stage
    from soundstage.cli import main
    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.manifests.table import read_manifest
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages.beats import STAGE

    manifest = make_synthetic_dataset(str(tmp_path / "data"), clips=5, seed=1, workers=0)
    cache = str(tmp_path / "cache")
    params = {"checkpoint": str(finetuned[0]), "device": "cpu"}
    summary = run_stage(STAGE, manifest, cache, params, workers=0, batch_size=4, progress=False, log=lambda *_: None)
    assert summary.ok and summary.done == 5, summary.format()
    reader = open_stage(summary.path)
    df = read_manifest(manifest)
    model = BEATs.from_checkpoint(finetuned[0])
    row = df.iloc[2]  # a v2 clip: 10 frames
    wave = torch.from_numpy(load_audio(str(tmp_path / "data" / row["audio_path"])).wave)
    record = reader[row["clip_id"]]
    # the column MIDs are kept with the output, so tags never need the checkpoint again
    assert StageDir(summary.path).meta()["metadata"] == {"class_mids": list(model.class_mids)}
    with torch.no_grad():
        clip, _ = model.extract_features(wave[None])
        last, _ = model.extract_features(wave[None, 16000 * 9 : 16000 * 10])
    assert record["second_probs"].shape == (int(row["num_frames"]), 527) == (10, 527)
    assert record["second_embeddings"].shape == (10, 64) and record["clip_probs"].shape == (527,)
    assert record["second_probs"].dtype == record["clip_probs"].dtype == np.float16
    np.testing.assert_allclose(record["clip_probs"], clip[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(record["second_probs"][9], last[0].numpy(), atol=1e-3)

    # tags: names via the checkpoint's MIDs (column i is csv row 7 i mod 527)
    names = [r["display_name"] for r in csv.DictReader(open(CLASS_LIST, newline="", encoding="utf-8"))]
    column_name = [names[(7 * i) % 527] for i in range(527)]
    probs = np.asarray(record["clip_probs"], np.float32)
    best = int(np.argmax(probs))
    result = CliRunner().invoke(main, ["tags", "show", row["clip_id"], "--cache", cache, "--top-k", "3", "--threshold", "0"])
    assert result.exit_code == 0, result.output
    assert f"{probs[best]:.3f}  {column_name[best]}" in result.output
    ninth = np.asarray(record["second_probs"][9], np.float32)
    line = next(line for line in result.output.splitlines() if line.strip().startswith("9  "))
    assert line.strip().split("  ", 1)[1].split("; ")[0] == column_name[int(np.argmax(ninth))]

    threshold = float(np.quantile(probs, 0.9))
    result = CliRunner().invoke(
        main, ["tags", "summary", "--manifest", manifest, "--cache", cache, "--threshold", str(threshold), "--top", "527"]
    )
    assert result.exit_code == 0, result.output
    for subset, ids in df.groupby("subset")["clip_id"]:
        counts = {}
        for cid in ids:
            for i in np.flatnonzero(np.asarray(reader[cid]["clip_probs"], np.float32) >= threshold):
                counts[column_name[i]] = counts.get(column_name[i], 0) + 1
        section = result.output.split(f"\n{subset}: {len(ids)} clips")[1].split("\n\n")[0]
        listed = {line.split("%  ", 1)[1]: int(line.split()[0]) for line in section.strip().splitlines()[1:]}
        assert listed == counts


def test_tiny_stand_in_checkpoint_is_reproducible(tmp_path):
    from soundstage.models import tiny

    first = tiny.build_beats(tmp_path / "a" / "beats.pt", seed=3)
    second = tiny.build_beats(tmp_path / "b" / "beats.pt", seed=3)
    with open(first, "rb") as f, open(second, "rb") as g:
        assert f.read() == g.read()  # same bytes, so the same fingerprint on every machine
    model = BEATs.from_checkpoint(first)
    classes = tiny.tiny_config("beats")["classes"]
    assert model.class_mids == list(tiny.beats_label_dict(classes).values())
    assert model.cfg.deep_norm and model.cfg.gru_rel_pos
