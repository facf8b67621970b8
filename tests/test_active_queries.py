"""Active queries: per-frame ids from units + BEATs tags through an explicit mapping; the stage
against a direct re-derivation from the cached upstreams; the default mapping; the export files
as bias_in_AVS loads them."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soundstage.stages.active_queries import (
    MappingError,
    default_mapping,
    frame_queries,
    mapping_identity,
    parse_mapping,
    tag_ranking,
)

torch.set_num_threads(1)

MIDS = ["/m/a", "/m/b", "/m/c", "/m/d"]


def test_frame_queries_clusters_first_then_tags_by_probability():
    mapping = parse_mapping({"queries": 10, "clusters": {"0": 0, "1": 1, "2": 2}, "classes": {"/m/a": 5, "/m/c": 6, "/m/d": 1}})
    clusters = np.array([[2, 0], [1, -1], [-1, -1], [3, 2]])  # 3 is not mapped, -1 = no frames
    probs = np.array(
        [
            [0.9, 0.8, 0.5, 0.1],  # a (0.9) and c (0.5) count; b is not mapped
            [0.1, 0.9, 0.3, 0.4],  # d: 0.4 is at the threshold: counts; maps to 1 = cluster 1's query
            [0.39, 0.0, 0.0, 0.0],  # nothing
            [0.6, 0.0, 0.7, 0.0],
        ],
        np.float16,
    )
    lists = frame_queries(clusters, probs, MIDS, mapping, 0.4)
    assert lists == [[2, 0, 5, 6], [1], [], [2, 6, 5]]


def test_mapping_is_checked_and_keyed_by_content(tmp_path):
    with pytest.raises(MappingError, match=r"outside \[0, 4\)"):
        parse_mapping({"queries": 4, "clusters": {"0": 4}})
    with pytest.raises(MappingError, match="expected"):
        parse_mapping({"clusters": {}})
    body = {"queries": 5, "clusters": {"0": 0}, "classes": {"/m/a": 3}, "_note": "comments are ignored"}
    (tmp_path / "a.json").write_text(json.dumps(body))
    (tmp_path / "b.json").write_text(json.dumps({**body, "_note": "another comment"}, indent=2))
    (tmp_path / "c.json").write_text(json.dumps({**body, "classes": {"/m/a": 4}}))
    assert mapping_identity(str(tmp_path / "a.json")) == mapping_identity(str(tmp_path / "b.json"))
    assert mapping_identity(str(tmp_path / "a.json")) != mapping_identity(str(tmp_path / "c.json"))


def test_default_mapping_and_tag_ranking():
    probs = [np.array([[0.5, 0.0, 0.9, 0.0], [0.5, 0.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.45, 0.1]])]
    ranking = tag_ranking(probs, MIDS, 0.4)
    assert ranking == ["/m/a", "/m/c"]  # 2 frames each: column order; b and d never reach 0.4
    mapping = default_mapping(3, ranking + ["/m/b"], queries=5)
    assert mapping == {"queries": 5, "clusters": {0: 0, 1: 1, 2: 2}, "classes": {"/m/a": 3, "/m/c": 4}}
    with pytest.raises(MappingError, match="fill all"):
        default_mapping(5, ranking, queries=5)


# ------------------------------------------------------------- through the cache and the CLI


@pytest.fixture(scope="module")
def upstream_cache(tmp_path_factory):
    from soundstage.manifests.synth import make_synthetic_dataset
    from soundstage.models.tiny import build_tiny_models
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    root = tmp_path_factory.mktemp("aq")
    manifest = make_synthetic_dataset(str(root / "data"), clips=4, seed=3, workers=0)
    models = build_tiny_models(str(root / "models"), names=["hubert", "beats"])
    cache = str(root / "cache")
    for name, params in [
        ("hubert", {"model": models["hubert"], "layer": 2, "device": "cpu"}),
        ("kmeans", {"k": 6, "percent": 1.0, "device": "cpu"}),
        ("units", {"top_k": 2}),
        ("beats", {"checkpoint": models["beats"], "device": "cpu"}),
    ]:
        summary = run_stage(get_stage(name), manifest, cache, params, workers=0, progress=False, log=lambda *_: None)
        assert summary.ok, summary.format()
    return root, manifest, cache


def invoke(*args):
    from soundstage.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_stage_and_export_round_trip(upstream_cache, tmp_path):
    from soundstage.cache import open_stage
    from soundstage.cache.table import read_manifest
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages.active_queries import STAGE, frame_lists

    root, manifest, cache = upstream_cache
    result = invoke(
        "export",
        "query-mapping",
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--queries",
        12,
        "--threshold",
        0.3,
        "--out",
        tmp_path / "mapping.json",
    )
    assert result.exit_code == 0, result.output
    mapping = json.loads((tmp_path / "mapping.json").read_text())
    assert mapping["clusters"] == {str(c): c for c in range(6)} and sorted(mapping["classes"].values()) == list(range(6, 12))

    for rule in ("majority", "top-k"):
        params = {"mapping": str(tmp_path / "mapping.json"), "threshold": 0.3, "clusters": rule}
        summary = run_stage(STAGE, manifest, cache, params, workers=0, progress=False, log=lambda *_: None)
        assert summary.ok and summary.done == 4, summary.format()
        units = open_stage(next((root / "cache" / "units").iterdir()).as_posix())
        beats_dir = next((root / "cache" / "beats").iterdir()).as_posix()
        beats = open_stage(beats_dir)
        mids = beats.meta["metadata"]["class_mids"]
        reader = open_stage(summary.path)
        for row in read_manifest(manifest).to_dict("records"):
            lists = frame_lists(reader[row["clip_id"]])
            u, b = units[row["clip_id"]], beats[row["clip_id"]]["second_probs"].astype(np.float32)
            assert len(lists) == int(row["num_frames"])
            for t, ids in enumerate(lists):  # the rule written out per frame
                clusters = [u["frame_majority"][t]] if rule == "majority" else list(u["frame_topk"][t])
                expect = [int(c) for c in clusters if c >= 0]
                tags = sorted((c for c in range(len(mids)) if b[t, c] >= 0.3), key=lambda c: (-b[t, c], c))
                expect += [mapping["classes"][mids[c]] for c in tags if mids[c] in mapping["classes"]]
                assert ids == list(dict.fromkeys(expect))
        assert any(len(ids) > 1 for r in reader for ids in frame_lists(reader[r]))

    # the same mapping elsewhere: the same output; the export writes what bias_in_AVS loads
    shutil.copy(tmp_path / "mapping.json", tmp_path / "moved.json")
    again = run_stage(
        STAGE,
        manifest,
        cache,
        {"mapping": str(tmp_path / "moved.json"), "threshold": 0.3, "clusters": "top-k"},
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    assert again.path == summary.path and again.done == 0
    out = tmp_path / "export"
    result = invoke(
        "export", "active-queries", "--manifest", manifest, "--cache", cache, "--active-queries", "clusters=top-k", "--out", out
    )
    assert result.exit_code == 0, result.output
    written = json.loads((out / "mapping.json").read_text())
    assert written["classes"] == mapping["classes"] and written["clusters"] == mapping["clusters"]
    assert written["_threshold"] == 0.3 and written["_clusters"] == "top-k"
    for cid in reader:
        loaded = torch.load(out / f"{cid}.pth", weights_only=True)
        assert loaded == frame_lists(reader[cid]) and all(isinstance(q, int) for ids in loaded for q in ids)
        # as the trainer consumes it: a multi-hot vector over Q per frame
        multi_hot = torch.zeros(len(loaded), 12)
        for t, ids in enumerate(loaded):
            multi_hot[t, ids] = 1
        assert multi_hot.sum(1).tolist() == [len(set(ids)) for ids in loaded]
    # no silent overwrite
    result = invoke(
        "export", "active-queries", "--manifest", manifest, "--cache", cache, "--active-queries", "clusters=top-k", "--out", out
    )
    assert result.exit_code == 1 and "not empty" in result.output
