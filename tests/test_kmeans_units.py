"""k-means fitting/importing, unit assignment, per-second summaries, and the hubert -> kmeans -> units
pipeline through the real runner on the synthetic AVSBench dataset."""

import collections
import os

import joblib
import numpy as np
import pytest
import torch

from soundstage.models.kmeans import (
    SKLEARN_FAIRSEQ_SETTINGS,
    fit_kmeans,
    inertia_per_frame,
    load_centroids,
    nearest_centroid,
    sample_clip_ids,
)
from soundstage.stages.units import per_second

torch.set_num_threads(1)


def _brute_force_argmin(x, c):
    d = ((np.asarray(x, np.float64)[:, None, :] - np.asarray(c, np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def test_nearest_centroid_equals_brute_force_argmin():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((40, 24)).astype(np.float32)
    c[7] = c[3]  # an exact tie: both must pick the lower index
    x = np.concatenate([rng.standard_normal((500, 24)), c[[3, 9]] + 1e-3]).astype(np.float16)
    index, dist = nearest_centroid(x, c, chunk=128)  # several chunks
    ref_index, ref_dist = _brute_force_argmin(x, c)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-9, atol=1e-9)
    assert 7 not in index
    assert inertia_per_frame(x, c) == pytest.approx(ref_dist.mean(), rel=1e-12)


def test_per_second_summary_matches_counting():
    rng = np.random.default_rng(1)
    units = rng.integers(0, 6, size=249)  # a 5 s clip: the last second has 49 frames
    out = per_second(units, num_units=6, seconds=6, top_k=4)  # 6 video frames: the last has no audio
    for i in range(6):
        seg = units[50 * i : 50 * i + 50]
        counts = collections.Counter(seg.tolist())
        ranked = sorted(counts, key=lambda u: (-counts[u], u))
        assert out["frame_counts"][i] == len(seg)
        expected_top = (ranked + [-1] * 4)[:4]
        assert out["frame_topk"][i].tolist() == expected_top
        assert out["frame_majority"][i] == expected_top[0]
        hist = np.array([counts.get(u, 0) for u in range(6)], float) / max(len(seg), 1)
        np.testing.assert_allclose(out["frame_hist"][i], hist, rtol=1e-6)
    assert out["frame_counts"][4] == 49 and out["frame_counts"][5] == 0
    assert out["frame_majority"][5] == -1 and out["frame_hist"][5].sum() == 0


def _blobs(seed=0, n_per=400, k=6, dim=16):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)) * 20
    x = np.concatenate([c + rng.standard_normal((n_per, dim)) for c in centers]).astype(np.float32)
    return x, centers


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_fit_kmeans_finds_separated_clusters(backend):
    x, centers = _blobs()
    options = {"n_init": 3} if backend == "sklearn" else {}  # keep the test fast; settings otherwise fairseq's
    c = fit_kmeans(x, 6, backend=backend, seed=0, device="cpu", **options)
    assert c.shape == (6, 16) and c.dtype == np.float32
    # every true centre has exactly one centroid next to it (noise std 1, centres ~20 apart)
    nearest, dist = nearest_centroid(centers, c)
    assert sorted(nearest.tolist()) == list(range(6))
    assert np.sqrt(dist).max() < 0.5
    assert inertia_per_frame(x, c) == pytest.approx(16.0, rel=0.1)  # the noise variance summed over dims


def test_sklearn_backend_uses_fairseq_settings():
    assert SKLEARN_FAIRSEQ_SETTINGS == dict(
        init="k-means++",
        max_iter=100,
        batch_size=10000,
        tol=0.0,
        max_no_improvement=100,
        init_size=None,
        n_init=20,
        reassignment_ratio=0.0,
        compute_labels=False,
    )


def test_sample_is_fairseqs_count_and_independent_of_row_order():
    ids = [f"clip{i:03d}" for i in range(37)]
    a = sample_clip_ids(ids, 0.1, seed=3)
    assert len(a) == 4  # ceil(37 * 0.1)
    assert a == sample_clip_ids(list(reversed(ids)), 0.1, seed=3)
    assert a != sample_clip_ids(ids, 0.1, seed=4)
    assert sample_clip_ids(ids, 1.0, 0) == sample_clip_ids(ids, -1, 0) == ids


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_import_centroids_npy_and_joblib_only_when_trusted(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    x, _ = _blobs(seed=2, n_per=50)
    km = MiniBatchKMeans(n_clusters=6, n_init=1, random_state=0, batch_size=64).fit(x)
    bin_path = str(tmp_path / "km.bin")
    joblib.dump(km, bin_path)  # how fairseq's learn_kmeans.py saves its model
    with pytest.raises(ValueError, match="trust-pickle"):
        load_centroids(bin_path)
    np.testing.assert_array_equal(load_centroids(bin_path, trust_pickle=True), km.cluster_centers_.astype(np.float32))

    np.save(tmp_path / "c.npy", km.cluster_centers_)
    np.testing.assert_array_equal(load_centroids(str(tmp_path / "c.npy")), km.cluster_centers_.astype(np.float32))

    km.evil = _Evil()  # a pickle that would run code: refused even when trusted
    joblib.dump(km, str(tmp_path / "evil.bin"))
    with pytest.raises(ValueError, match="evil.bin: refusing to load global .*system"):
        load_centroids(str(tmp_path / "evil.bin"), trust_pickle=True)


# ----------------------------------------------------- hubert -> kmeans -> units, through the runner


@pytest.fixture(scope="module")
def hubert_cache(tmp_path_factory):
    from transformers import HubertModel

    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.models.tiny import tiny_hubert_config
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    root = tmp_path_factory.mktemp("pipeline")
    manifest = make_synthetic_dataset(str(root / "synth"), clips=5, seed=1, workers=1)
    torch.manual_seed(0)
    HubertModel(tiny_hubert_config()).save_pretrained(root / "hubert")
    cache = str(root / "cache")
    params = {"model": str(root / "hubert"), "layer": 2, "device": "cpu"}
    summary = run_stage(get_stage("hubert"), manifest, cache, params, workers=0, progress=False, log=lambda *_: None)
    assert summary.ok and summary.done == 5
    return manifest, cache, params, summary.path


def _run(name, manifest, cache, params):
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    summary = run_stage(get_stage(name), manifest, cache, params, workers=0, progress=False, log=lambda *_: None)
    assert summary.ok, summary.format()
    return summary


def _snapshot(stage_dir):
    parts = os.path.join(stage_dir, "parts")
    return {name: os.stat(os.path.join(parts, name)).st_mtime_ns for name in os.listdir(parts)}


def test_units_pipeline_and_refit_reuses_features(hubert_cache, tmp_path):
    from click.testing import CliRunner

    from soundstage.cache import open_stage, read_result
    from soundstage.cli import main
    from soundstage.manifests.table import read_manifest
    from soundstage.models.tiny import tiny_hubert_config

    manifest, cache, hubert_params, hubert_dir = hubert_cache
    dim = tiny_hubert_config().hidden_size  # of the features the fixture's model writes
    before = _snapshot(hubert_dir)
    km4 = _run("kmeans", manifest, cache, {"k": 4, "percent": 1.0, "device": "cpu"})
    result = read_result(km4.path)
    centroids = result["centroids"]
    assert centroids.shape == (4, dim)
    feats = open_stage(hubert_dir)
    all_frames = np.concatenate([feats[c]["features"].astype(np.float32) for c in sorted(feats)])
    assert result["sample_frames"][0] == len(all_frames)
    assert result["inertia_per_frame"][0] == pytest.approx(_brute_force_argmin(all_frames, centroids)[1].mean(), rel=1e-6)

    units = _run("units", manifest, cache, {"top_k": 2})
    reader = open_stage(units.path)
    rows = {r["clip_id"]: r for r in read_manifest(manifest).to_dict("records")}
    for cid in rows:
        record = reader[cid]
        x = feats[cid]["features"]
        np.testing.assert_array_equal(record["units"], _brute_force_argmin(x, centroids)[0])
        seconds = int(rows[cid]["num_frames"])
        assert record["frame_hist"].shape == (seconds, 4) and record["frame_topk"].shape == (seconds, 2)
        for i in range(seconds):
            seg = record["units"][50 * i : 50 * i + 50]
            np.testing.assert_allclose(record["frame_hist"][i], np.bincount(seg, minlength=4) / len(seg), rtol=1e-6)
            assert record["frame_majority"][i] == np.bincount(seg, minlength=4).argmax()

    # another K through the CLI: only k-means is fitted again; the features are read, not recomputed
    result = CliRunner().invoke(
        main, ["kmeans", "--manifest", manifest, "--cache", cache, "--k", "5", "--percent", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert _snapshot(hubert_dir) == before
    again = _run("hubert", manifest, cache, hubert_params)
    assert again.done == 0 and again.cached == 5
    # imported centroids instead of a fit
    imported = np.random.default_rng(5).standard_normal((7, dim)).astype(np.float32)
    np.save(tmp_path / "c.npy", imported)
    km_imported = _run("kmeans", manifest, cache, {"import_centroids": str(tmp_path / "c.npy"), "percent": 1.0})
    np.testing.assert_array_equal(read_result(km_imported.path)["centroids"], imported)
    assert len(os.listdir(os.path.join(cache, "kmeans"))) == 3

    # fairseq .km export, in manifest order
    km_path = str(tmp_path / "train.km")
    result = CliRunner().invoke(main, ["export", "km", "--out", km_path, "--cache", cache, "--manifest", manifest])
    assert result.exit_code == 0, result.output
    lines = open(km_path).read().splitlines()
    ids = open(str(tmp_path / "train.ids")).read().splitlines()
    assert ids == list(rows)
    for cid, line in zip(ids, lines):
        assert [int(u) for u in line.split(" ")] == reader[cid]["units"].tolist()
    _check_hubert_layout(tmp_path, rows, lines, manifest)

    # the k-means model as learn_kmeans.py saves it: ApplyKmeans gives the cached units
    bin_path = str(tmp_path / "km4.bin")
    result = CliRunner().invoke(
        main, ["export", "kmeans-model", "--cache", cache, "--kmeans", km4.fingerprint, "--out", bin_path]
    )
    assert result.exit_code == 0, result.output
    km = joblib.load(bin_path)
    assert type(km).__name__ == "MiniBatchKMeans" and km.n_clusters == 4
    np.testing.assert_array_equal(km.cluster_centers_, centroids)
    for cid in rows:
        x = feats[cid]["features"].astype(np.float32)  # what dump_hubert_feature.py would hold
        np.testing.assert_array_equal(_apply_kmeans(km, x), reader[cid]["units"])
        np.testing.assert_array_equal(km.predict(x.astype(np.float64)), reader[cid]["units"])
    np.testing.assert_array_equal(load_centroids(bin_path, trust_pickle=True), centroids)  # and back in


def _apply_kmeans(km, x):
    """dump_km_label.py's ApplyKmeans (numpy path), written out."""
    c = km.cluster_centers_.transpose()
    dist = (x**2).sum(1, keepdims=True) - 2 * np.matmul(x, c) + (c**2).sum(0, keepdims=True)
    return np.argmin(dist, axis=1)


def _check_hubert_layout(folder, rows, km_lines, manifest):
    """SPLIT.tsv as HuBERT's dataset reads it (root line, then path TAB samples of 16 kHz audio whose
    length agrees with the labels at 50 Hz), and dict.km.txt: one "unit count" line per unit."""
    import soundfile as sf

    from soundstage.audio import load_audio
    from soundstage.manifests.table import resolve_path

    with open(folder / "train.tsv") as f:
        root = f.readline().strip()
        items = [line.rstrip("\n").split("\t") for line in f]
    assert len(items) == len(rows) == len(km_lines)
    for (rel, size), row, line in zip(items, rows.values(), km_lines):
        path = os.path.join(root, rel)
        wave, sr = sf.read(path)
        assert sr == 16000 and len(wave) == int(size)
        assert abs(int(size) / 16000 - len(line.split()) / 50) < 0.1  # verify_label_lengths' tolerance
        ours = load_audio(resolve_path(row["audio_path"], os.path.dirname(manifest))).wave
        np.testing.assert_allclose(wave if wave.ndim == 1 else wave.mean(-1), ours, atol=1e-7, rtol=0)
    units = [int(u) for line in km_lines for u in line.split()]
    with open(folder / "dict.km.txt") as f:
        entries = [line.split() for line in f]
    assert [int(u) for u, _ in entries] == list(range(4))
    assert [int(n) for _, n in entries] == np.bincount(units, minlength=4).tolist()
