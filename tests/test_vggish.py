"""VGGish: front end against a direct computation of the formula, network against a plain
torch.nn reconstruction of the torchvggish layout, PCA + quantisation against the formula, the
stage's row rule (num_frames, padding, too-short audio)."""

import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from soundstage.models import vggish
from soundstage.models.tiny import build_vggish, tiny_config

torch.set_num_threads(1)


def tone_noise(seconds, seed=0, sr=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    return np.round(wave * 32767).astype(np.int16) / np.float32(32768)  # what a PCM_16 file holds


# ------------------------------------------------------------------------------ front end


def direct_log_mel(wave: np.ndarray) -> np.ndarray:
    """The formula written out: frame by frame, a DFT as a sum over samples, each mel weight
    from the triangle's definition (HTK mel, 64 bands 125-7500 Hz, DC bin excluded)."""
    n_frames = 1 + (len(wave) - 400) // 160
    k = np.arange(257)[:, None]
    dft = np.exp(-2j * math.pi * k * np.arange(400)[None, :] / 512)  # 512-point DFT of 400 samples
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / 400) for i in range(400)])

    def mel(f):
        return 1127.0 * math.log(1 + f / 700.0)

    edges = [mel(125) + (mel(7500) - mel(125)) * j / 65 for j in range(66)]
    weights = np.zeros((257, 64))
    for b in range(1, 257):
        m = mel(b * 8000 / 256)
        for band in range(64):
            lo, mid, hi = edges[band : band + 3]
            if lo < m < hi:
                weights[b, band] = (m - lo) / (mid - lo) if m <= mid else (hi - m) / (hi - mid)
    out = np.zeros((n_frames, 64))
    for f in range(n_frames):
        segment = wave[160 * f : 160 * f + 400].astype(np.float64) * window
        out[f] = np.log(np.abs(dft @ segment) @ weights + 0.01)
    return out


def test_front_end_equals_the_formula_computed_directly():
    wave = tone_noise(1.3)
    got = vggish.log_mel(wave)
    ref = direct_log_mel(wave)
    assert got.shape == ref.shape == (1 + (len(wave) - 400) // 160, 64)
    np.testing.assert_allclose(got, ref, atol=1e-9, rtol=0)
    ex = vggish.examples(wave)
    assert ex.shape == (1, 96, 64) and ex.dtype == np.float32
    np.testing.assert_allclose(ex[0], ref[:96], atol=1e-5, rtol=0)


def test_batched_front_end_equals_one_at_a_time():
    waves = np.stack([tone_noise(1.0, seed=s) for s in range(3)])
    batched = vggish.log_mel(waves)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], vggish.log_mel(waves[i]))


@pytest.mark.parametrize("seconds, count", [(5.0, 5), (4.8, 4), (10.0, 10), (0.975, 1), (0.9749375, 0)])
def test_example_count_rule(seconds, count):
    samples = round(seconds * 16000)
    assert vggish.example_count(samples) == count
    assert len(vggish.examples(np.zeros(samples, np.float32))) == count


def test_examples_hop_96_frames_and_drop_the_remainder():
    wave = tone_noise(2.5, seed=3)
    mel = vggish.log_mel(wave)
    ex = vggish.examples(wave)
    assert len(mel) == 248 and ex.shape == (2, 96, 64)  # 56 frames of remainder dropped
    np.testing.assert_allclose(ex[1], mel[96:192], atol=1e-5)


def test_int16_wav_is_read_as_int16_over_32768(tmp_path):
    from soundstage.audio import load_audio

    ints = np.array([-32768, -1, 0, 1, 12345, 32767] * 3000, np.int16)
    sf.write(tmp_path / "a.wav", ints, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(str(tmp_path / "a.wav")).wave, ints.astype(np.float64) / 32768.0)


# ------------------------------------------------------------------------------ network

#: the torchvggish state dict, written out by hand: name -> shape (real widths)
REAL_SHAPES = {
    "features.0.weight": (64, 1, 3, 3),
    "features.3.weight": (128, 64, 3, 3),
    "features.6.weight": (256, 128, 3, 3),
    "features.8.weight": (256, 256, 3, 3),
    "features.11.weight": (512, 256, 3, 3),
    "features.13.weight": (512, 512, 3, 3),
    "embeddings.0.weight": (4096, 12288),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.4.weight": (128, 4096),
}
REAL_SHAPES.update({k.replace("weight", "bias"): v[:1] for k, v in list(REAL_SHAPES.items())})


def test_reference_layout_has_the_torchvggish_names_and_shapes():
    with torch.device("meta"):
        state = vggish.VGGish().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == REAL_SHAPES


def plain_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvggish's forward rebuilt from the state dict with torch.nn.functional: conv+ReLU,
    pools after convs 0, 3, 8, 13; NCHW -> NHWC by two transposes, flatten, 3 Linear+ReLU."""
    for i in (0, 3, 6, 8, 11, 13):
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
        if i in (0, 3, 8, 13):
            x = F.max_pool2d(x, 2, 2)
    x = torch.transpose(torch.transpose(x, 1, 3), 1, 2).contiguous().view(x.size(0), -1)
    for i in (0, 2, 4):
        x = F.relu(F.linear(x, state[f"embeddings.{i}.weight"], state[f"embeddings.{i}.bias"]))
    return x


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_vggish(tmp_path_factory.mktemp("vggish") / "vggish_tiny.pth", seed=0)


def random_state(seed=0) -> dict:
    spec = tiny_config("vggish")
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in vggish.VGGish(spec["layers"], spec["hidden"]).state_dict().items()}
    return {k: 0.3 * torch.randn(s, generator=g) + (0.05 if k.endswith("bias") else 0) for k, s in shapes.items()}


def test_network_equals_plain_reconstruction_on_random_weights(tmp_path):
    state = random_state()
    torch.save(state, tmp_path / "w.pth")
    model = vggish.load_vggish(str(tmp_path / "w.pth"))
    x = torch.from_numpy(np.stack([vggish.examples(tone_noise(1.0, seed=s))[0] for s in range(4)]))
    with torch.no_grad():
        got = model(x[:, None])
        ref = plain_forward(state, x[:, None])
    assert got.shape == (4, 128)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got >= 0).all() and got.std() > 0.01 and (got[0] - got[1]).abs().max() > 1e-3


def test_loader_is_strict_and_refuses_pickled_code(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    model = vggish.load_vggish(tiny_checkpoint)
    assert model.layers == tuple(tiny_config("vggish")["layers"]) and model.hidden == tiny_config("vggish")["hidden"]
    torch.save(dict(state, extra=torch.zeros(1)), tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="extra"):
        vggish.load_vggish(str(tmp_path / "extra.pth"))
    torch.save({k: v for k, v in state.items() if k != "embeddings.4.bias"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="embeddings.4.bias"):
        vggish.load_vggish(str(tmp_path / "short.pth"))
    torch.save(dict(state, hook=np.random.default_rng), tmp_path / "code.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        vggish.load_vggish(str(tmp_path / "code.pth"))


# ------------------------------------------------------------------- both variants vs the references

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture(scope="module")
def full_size_checkpoint(tmp_path_factory):
    import sys

    sys.path.insert(0, REFERENCE_DIR)
    try:
        import vggish_inputs
    finally:
        sys.path.remove(REFERENCE_DIR)
    folder = tmp_path_factory.mktemp("vggish_full")
    torch.save({k: torch.from_numpy(v) for k, v in vggish_inputs.full_size_weights(0).items()}, folder / "vggish.pth")
    files = {(sr, ch): vggish_inputs.write_file(folder, sr, ch) for sr, ch in vggish_inputs.FILES}
    return str(folder / "vggish.pth"), files


@pytest.mark.parametrize("variant", vggish.VARIANTS)
def test_both_variants_equal_the_reference_code_at_16_44_1_and_48_khz(tmp_path, full_size_checkpoint, variant):
    """Stored outputs of harritaylor/torchvggish (``wavfile_to_examples`` + ``VGG``) and of towhee's
    ``torch_vggish.VGG`` on the same examples, for seeded full-size weights and 16 kHz mono, 44.1 kHz
    stereo and 48 kHz mono 16-bit WAVs (tests/reference/make_vggish_reference.py wrote them)."""
    from soundstage.stages.vggish import STAGE, load

    checkpoint, files = full_size_checkpoint
    expected = np.load(os.path.join(REFERENCE_DIR, "vggish_reference.npz"))
    params = stage_params(checkpoint, variant=variant)
    model = STAGE.setup(params)
    for (sr, ch), path in files.items():
        item = load({"audio_path": path, "num_frames": ""}, ctx(tmp_path))
        got = STAGE.process(model, [item], params)[0]["embeddings"]
        ref = expected[f"{variant}_{sr}_{ch}"]
        assert got.shape == ref.shape == (3, 128)
        np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0, err_msg=f"{variant} at {sr} Hz, {ch} channel(s)")
    if variant == "towhee":
        assert (got < 0).mean() > 0.3  # signed, as GAVS's shipped features
    else:
        assert (got >= 0).all()


def test_towhee_variant_refuses_pca_params(tiny_checkpoint, tmp_path):
    from soundstage.stages.vggish import STAGE

    write_pca(tmp_path / "pca.pth")
    with pytest.raises(ValueError, match="--variant torchvggish only"):
        STAGE.setup(stage_params(tiny_checkpoint, variant="towhee", pca_params=str(tmp_path / "pca.pth")))


# ------------------------------------------------------------------------------ PCA


def write_pca(path, seed=0, column_means=False):
    """The released layout: numpy arrays (torchvggish's file was never converted to tensors)."""
    rng = np.random.default_rng(seed)
    eigen = rng.standard_normal((128, 128)) * 0.1
    means = rng.standard_normal(128) * 0.1
    torch.save({"pca_eigen_vectors": eigen, "pca_means": means.reshape(-1, 1) if column_means else means}, path)
    return eigen, means


@pytest.mark.parametrize("column_means", [False, True])
def test_pca_quantisation_equals_the_formula(tmp_path, column_means):
    eigen, means = write_pca(tmp_path / "pca.pth", column_means=column_means)
    loaded = vggish.load_pca_params(str(tmp_path / "pca.pth"))
    x = np.abs(np.random.default_rng(1).standard_normal((50, 128))).astype(np.float32)
    got = vggish.postprocess(torch.from_numpy(x), *loaded).numpy()
    # the formula in float64: whiten, clip to [-2, 2], (v + 2) * 255 / 4, round
    scaled = (np.clip((eigen @ (x.T.astype(np.float64) - means[:, None])).T, -2, 2) + 2) * 255 / 4
    ref = np.round(scaled)
    near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3  # float32 may round these either way
    assert got.shape == (50, 128) and set(np.unique(got)) <= set(range(256))
    np.testing.assert_array_equal(got[~near_half], ref[~near_half])
    assert np.abs(got - ref).max() <= 1
    assert (got == 0).any() and (got == 255).any() and ((got > 0) & (got < 255)).mean() > 0.5


def test_pca_params_of_the_wrong_shape_are_refused(tmp_path):
    torch.save({"pca_eigen_vectors": np.zeros((128, 64)), "pca_means": np.zeros(128)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"\(128, 64\)"):
        vggish.load_pca_params(str(tmp_path / "bad.pth"))
    torch.save({"eigen": np.zeros((128, 128))}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match="pca_eigen_vectors and pca_means"):
        vggish.load_pca_params(str(tmp_path / "keys.pth"))


# ------------------------------------------------------------------------------ the stage


def ctx(tmp_path):
    from soundstage.pipeline.stage import LoadContext

    return LoadContext(params={}, upstream={}, manifest_dir=str(tmp_path))


def stage_params(checkpoint, **extra):
    return {
        "checkpoint": str(checkpoint),
        "variant": "torchvggish",
        "pca_params": None,
        "pad": "repeat-last",
        "device": "cpu",
        **extra,
    }


def test_rows_follow_num_frames_with_either_padding(tmp_path, tiny_checkpoint):
    from soundstage.stages.vggish import STAGE, load

    sf.write(tmp_path / "a.wav", tone_noise(4.8), 16000, subtype="PCM_16")
    item = load({"audio_path": "a.wav", "num_frames": "5"}, ctx(tmp_path))
    assert item["raw"] == 4 and item["rows"] == 5 and len(item["examples"]) == 4
    model = STAGE.setup(stage_params(tiny_checkpoint))
    alone = model.embed(vggish.examples(tone_noise(4.8)))
    repeat = STAGE.process(model, [item], stage_params(tiny_checkpoint))[0]
    zero = STAGE.process(model, [item], stage_params(tiny_checkpoint, pad="zero"))[0]
    assert repeat["raw_patches"] == 4 and repeat["embeddings"].shape == (5, 128)
    np.testing.assert_array_equal(repeat["embeddings"][:4], alone)
    np.testing.assert_array_equal(repeat["embeddings"][4], alone[3])
    np.testing.assert_array_equal(zero["embeddings"][:4], alone)
    assert not zero["embeddings"][4].any()
    # more audio than frames: cut; no num_frames: every example
    assert load({"audio_path": "a.wav", "num_frames": "3"}, ctx(tmp_path))["examples"].shape == (3, 96, 64)
    assert load({"audio_path": "a.wav", "num_frames": ""}, ctx(tmp_path))["rows"] == 4


def test_too_short_audio_is_a_clip_error(tmp_path):
    from soundstage.pipeline.stage import ClipError
    from soundstage.stages.vggish import load

    sf.write(tmp_path / "short.wav", np.zeros(vggish.MIN_SAMPLES - 1, np.float32), 16000)
    with pytest.raises(ClipError, match="too short for one VGGish example"):
        load({"audio_path": "short.wav", "num_frames": "5"}, ctx(tmp_path))
    sf.write(tmp_path / "ok.wav", np.zeros(vggish.MIN_SAMPLES, np.float32), 16000)
    assert load({"audio_path": "ok.wav", "num_frames": ""}, ctx(tmp_path))["raw"] == 1


def test_batch_of_mixed_lengths_equals_one_at_a_time(tmp_path, tiny_checkpoint):
    from soundstage.stages.vggish import STAGE

    params = stage_params(tiny_checkpoint)
    model = STAGE.setup(params)
    items = [
        {"examples": vggish.examples(tone_noise(s, seed=i)), "raw": r, "rows": r}
        for i, (s, r) in enumerate([(5.0, 5), (2.0, 2), (10.0, 10)])
    ]
    batched = STAGE.process(model, items, params)
    for item, out in zip(items, batched):
        np.testing.assert_allclose(out["embeddings"], STAGE.process(model, [item], params)[0]["embeddings"], atol=1e-6)


def test_embed_waveform_gives_the_stage_rows_and_resamples(tmp_path, tiny_checkpoint):
    from soundstage.audio import resample, resample_kaiser_best
    from soundstage.stages.vggish import STAGE, embed_waveform, load

    params = stage_params(tiny_checkpoint)
    model = STAGE.setup(params)
    wave = tone_noise(4.8)
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="PCM_16")
    stored = STAGE.process(model, [load({"audio_path": "a.wav", "num_frames": "5"}, ctx(tmp_path))], params)[0]
    np.testing.assert_array_equal(embed_waveform(model, wave, 16000, params, num_frames=5), stored["embeddings"])
    assert embed_waveform(model, wave, 16000, params).shape == (4, 128)
    silence = embed_waveform(model, np.zeros(5 * 48000, np.float32), 48000, params, num_frames=5)
    assert silence.shape == (5, 128) and np.allclose(silence, silence[0])  # every silent example is alike
    at_48k = resample(wave, 16000, 48000)
    np.testing.assert_allclose(
        embed_waveform(model, at_48k, 48000, params),
        model.embed(vggish.examples(resample_kaiser_best(at_48k, 48000, 16000))),
        atol=1e-6,
    )


def test_stage_end_to_end_with_pca(tmp_path, tiny_checkpoint):
    from soundstage.audio import load_audio, resample_kaiser_best
    from soundstage.cache import open_stage
    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.manifests.table import read_manifest
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages.vggish import STAGE

    manifest = make_synthetic_dataset(str(tmp_path / "data"), clips=4, seed=2, workers=0)
    eigen, means = write_pca(tmp_path / "pca.pth")
    cache = str(tmp_path / "cache")
    params = {"checkpoint": str(tiny_checkpoint), "pca_params": str(tmp_path / "pca.pth"), "device": "cpu"}
    summary = run_stage(STAGE, manifest, cache, params, workers=0, batch_size=3, progress=False, log=lambda *_: None)
    assert summary.ok and summary.done == 4, summary.format()
    raw = run_stage(STAGE, manifest, cache, dict(params, pca_params=None), workers=0, progress=False, log=lambda *_: None)
    assert raw.path != summary.path  # PCA is part of the fingerprint
    model = vggish.load_vggish(str(tiny_checkpoint))
    for row in read_manifest(manifest).to_dict("records"):
        wave = load_audio(str(tmp_path / "data" / row["audio_path"]), resampler=resample_kaiser_best).wave
        with torch.no_grad():
            emb = model(torch.from_numpy(vggish.examples(wave)))
        record, raw_record = open_stage(summary.path)[row["clip_id"]], open_stage(raw.path)[row["clip_id"]]
        assert record["embeddings"].shape == (int(row["num_frames"]), 128) and record["embeddings"].dtype == np.float32
        assert record["raw_patches"] == len(emb)
        np.testing.assert_allclose(raw_record["embeddings"], emb.numpy()[: int(row["num_frames"])], atol=1e-6)
        quantised = vggish.postprocess(emb, eigen.astype(np.float32), means.astype(np.float32)).numpy()
        np.testing.assert_array_equal(record["embeddings"], quantised[: int(row["num_frames"])])


# ------------------------------------------------------------------------------ vggish-npy export


@pytest.fixture(scope="module")
def vggish_cache(tmp_path_factory, tiny_checkpoint):
    """A synthetic dataset plus a clip too short for VGGish (a recorded failure), embedded raw and
    with PCA (two outputs in one cache), and a pipeline file naming the raw one."""
    import pandas as pd

    from soundstage.cache.table import read_manifest
    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages.vggish import STAGE

    root = tmp_path_factory.mktemp("vggish_export")
    manifest = make_synthetic_dataset(str(root / "data"), clips=6, seed=4, workers=0)
    sf.write(root / "data" / "short.wav", np.zeros(8000, np.float32), 16000)
    rows = read_manifest(manifest)
    short = dict(rows.iloc[0], clip_id="short_clip", audio_path="short.wav", num_frames="5")
    pd.concat([rows, pd.DataFrame([short])]).to_csv(manifest, index=False)
    write_pca(root / "pca.pth")
    cache = str(root / "cache")
    outputs = {}
    for kind, pca in (("raw", None), ("pca", str(root / "pca.pth"))):
        params = {"checkpoint": str(tiny_checkpoint), "pca_params": pca, "device": "cpu"}
        summary = run_stage(STAGE, manifest, cache, params, workers=0, progress=False, log=lambda *_: None)
        assert summary.done == 6 and [cid for cid, _ in summary.failed] == ["short_clip"]
        outputs[kind] = summary.path
    (root / "pipeline.yaml").write_text(
        f"manifest: data/manifest.csv\ncache: cache\nstages:\n  vggish:\n    checkpoint: {tiny_checkpoint}\n"
    )
    return root, manifest, outputs


def invoke(*args):
    from click.testing import CliRunner

    from soundstage.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_vggish_npy_round_trip_names_missing_clips(vggish_cache, tmp_path):
    import pandas as pd

    from soundstage.cache import open_stage
    from soundstage.cache.table import read_manifest

    root, manifest, outputs = vggish_cache
    ghost = tmp_path / "with_ghost.csv"
    rows = read_manifest(manifest)
    pd.concat([rows, pd.DataFrame([dict(rows.iloc[1], clip_id="ghost_clip")])]).to_csv(ghost, index=False)
    result = invoke("export", "vggish-npy", "--config", root / "pipeline.yaml", "--manifest", ghost, "--out", tmp_path / "a")
    assert result.exit_code == 1
    assert "short_clip: audio of 0.500 s is too short" in result.output and "ghost_clip: not computed" in result.output
    assert not (tmp_path / "a").exists()  # nothing written

    result = invoke(
        "export",
        "vggish-npy",
        "--config",
        root / "pipeline.yaml",
        "--manifest",
        ghost,
        "--out",
        tmp_path / "a",
        "--allow-missing",
    )
    assert result.exit_code == 0 and "ghost_clip" in result.output and "short_clip" in result.output
    reader = open_stage(outputs["raw"])  # the pipeline file's parameters pick the raw output
    written = sorted(p.stem for p in (tmp_path / "a").iterdir())
    assert written == sorted(reader) and len(written) == 6
    for cid in written:
        loaded = np.load(tmp_path / "a" / f"{cid}.npy")  # as GAVS / bias_in_AVS read feat_aud
        assert loaded.dtype == np.float32 and loaded.shape[1] == 128
        np.testing.assert_array_equal(loaded, reader[cid]["embeddings"])

    result = invoke("export", "vggish-npy", "--config", root / "pipeline.yaml", "--out", tmp_path / "a", "--allow-missing")
    assert result.exit_code == 1 and "not empty" in result.output
    result = invoke("export", "vggish-npy", "--manifest", manifest, "--cache", root / "cache", "--out", tmp_path / "b")
    assert result.exit_code == 1 and "2 vggish outputs" in result.output  # raw and PCA: must choose


def test_vggish_npy_avsbench_object_layout(vggish_cache, tmp_path):
    from soundstage.cache import open_stage
    from soundstage.cache.table import read_manifest

    root, manifest, outputs = vggish_cache
    rows = read_manifest(manifest)
    v1 = rows[rows["subset"].isin(["v1s", "v1m"]) & (rows["clip_id"] != "short_clip")]
    v1.to_csv(tmp_path / "v1.csv", index=False)
    fingerprint = os.path.basename(outputs["pca"])
    result = invoke(
        "export",
        "vggish-npy",
        "--manifest",
        tmp_path / "v1.csv",
        "--cache",
        root / "cache",
        "--vggish",
        fingerprint,
        "--layout",
        "avsbench-object",
        "--out",
        tmp_path / "obj",
    )
    assert result.exit_code == 0, result.output
    reader = open_stage(outputs["pca"])
    for row in v1.to_dict("records"):
        where = [row["split"], row["a_obj"].replace("-", "_")] if row["subset"] == "v1s" else [row["split"]]
        loaded = np.load(os.path.join(tmp_path, "obj", *where, row["clip_id"] + ".npy"))
        np.testing.assert_array_equal(loaded, reader[row["clip_id"]]["embeddings"])
    result = invoke(
        "export",
        "vggish-npy",
        "--manifest",
        manifest,
        "--cache",
        root / "cache",
        "--vggish",
        fingerprint,
        "--layout",
        "avsbench-object",
        "--out",
        tmp_path / "obj2",
        "--allow-missing",
    )
    assert result.exit_code == 1 and "no place in the AVSBench-object layout" in result.output


def test_vggish_npy_per_subset_layout(vggish_cache, tmp_path):
    """OUT/<subset>_vggish_embs/<uid>.npy: the path GAVS and bias_in_AVS build from ver and uid."""
    from soundstage.cache import open_stage

    root, manifest, outputs = vggish_cache
    out = tmp_path / "feature_extract"
    result = invoke(
        "export", "vggish-npy", "--config", root / "pipeline.yaml", "--layout", "per-subset", "--out", out, "--allow-missing"
    )
    assert result.exit_code == 0, result.output
    reader = open_stage(outputs["raw"])
    rows = [r for r in read_manifest_rows(manifest) if r["clip_id"] in reader]
    assert sorted(os.listdir(out)) == sorted({f"{r['subset']}_vggish_embs" for r in rows})
    for row in rows:
        ver, vid = row["subset"], row["clip_id"]
        loaded = np.load(f"{out}/{ver}_vggish_embs/{vid}.npy")
        np.testing.assert_array_equal(loaded, reader[vid]["embeddings"])
    assert sum(len(os.listdir(out / d)) for d in os.listdir(out)) == len(rows)


def read_manifest_rows(manifest):
    from soundstage.cache.table import read_manifest

    return read_manifest(manifest).to_dict("records")


def test_log_mel_export_is_what_avsbench_object_unpickles(vggish_cache, tmp_path):
    """OUT/<split>/<category>/<uid>.pkl (S4) and OUT/<split>/<uid>.pkl (MS3): a [5, 1, 96, 64]
    tensor, the front end's examples padded by repeating the last; v2 skipped; short audio named."""
    import pickle

    import pandas as pd

    from soundstage.cache.table import read_manifest

    root, manifest, _ = vggish_cache
    rows = read_manifest(manifest)
    with_v2 = root / "data" / "with_v2.csv"  # beside the manifest: its paths are relative to it
    pd.concat([rows, pd.DataFrame([dict(rows.iloc[1], clip_id="a_v2_clip", subset="v2")])]).to_csv(with_v2, index=False)
    v2_count = int((rows["subset"] == "v2").sum()) + 1
    out = tmp_path / "audio_log_mel"
    result = invoke("export", "log-mel", "--manifest", with_v2, "--out", out)
    assert result.exit_code == 1 and "short_clip: audio of 0.500 s is too short" in result.output
    assert f"skipped {v2_count} clip(s)" in result.output
    checked_directly = 0
    for row in read_manifest_rows(manifest):
        if row["clip_id"] == "short_clip" or row["subset"] == "v2":
            continue
        where = [row["split"], row["a_obj"].replace("-", "_")] if row["subset"] == "v1s" else [row["split"]]
        with open(os.path.join(out, *where, row["clip_id"] + ".pkl"), "rb") as fr:  # as their load_audio_lm
            log_mel = pickle.load(fr).detach()
        assert log_mel.shape == (5, 1, 96, 64) and log_mel.dtype == torch.float32
        wave, sr = sf.read(root / "data" / row["audio_path"], dtype="int16")
        if sr == 16000 and wave.ndim == 1 and checked_directly < 1:  # the formula written out
            ref = direct_log_mel(wave / 32768.0)
            count = 1 + (len(ref) - 96) // 96
            expected = [ref[96 * min(i, count - 1) : 96 * min(i, count - 1) + 96] for i in range(5)]
            np.testing.assert_allclose(log_mel[:, 0].numpy(), np.stack(expected), atol=1e-5, rtol=0)
            checked_directly += 1
        else:
            found = vggish.examples(load_audio_wave(root / "data" / row["audio_path"]))
            np.testing.assert_array_equal(log_mel[: len(found), 0].numpy(), found[:5])
            assert (log_mel[len(found) :] == log_mel[len(found) - 1]).all()
    assert checked_directly == 1 and len(list(out.rglob("*.pkl"))) == len(rows) - v2_count
    assert not list(out.rglob("a_v2_clip*")) and not list(out.rglob("short_clip*"))


def load_audio_wave(path):
    from soundstage.audio import load_audio, resample_kaiser_best

    return load_audio(str(path), resampler=resample_kaiser_best).wave
