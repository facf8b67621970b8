"""The AVSBench manifest builder: both layouts, every fault kind, filters, errors and the CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures_synth import (  # noqa: F401  (synth_dir is a fixture)
    append_metadata_lines,
    copy_dataset,
    make_object_layout,
    metadata_rows,
    synth_dir,
)
from PIL import Image

from soundstage.cli import main
from soundstage.manifests.avsbench import MANIFEST_COLUMNS, build_avsbench_manifest
from soundstage.manifests.check import check_image
from soundstage.manifests.palette import AVSBENCH_CLASSES, colour_to_index, label2idx, palette
from soundstage.manifests.table import (
    annotated_frames,
    frame_path,
    label_path,
    mask_kind,
    read_manifest,
    resolve_path,
)


def problems_of(manifest) -> list[tuple[str, str]]:
    return [(r.clip_id, r.problem) for r in manifest.itertuples() if r.problem]


def run_cli(*args):
    return CliRunner().invoke(main, ["manifest", *args])


# ---------------------------------------------------------------- palette


def test_palette_is_the_voc_bit_interleaved_colormap():
    # Independent formulation: bit (3*j + c) of the index becomes bit (7 - j) of channel c.
    expected = [[sum(((index >> (3 * j + c)) & 1) << (7 - j) for j in range(8)) for c in range(3)] for index in range(71)]
    assert palette().tolist() == expected
    assert palette()[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len(AVSBENCH_CLASSES) == 71 and AVSBENCH_CLASSES[0] == "background"
    assert list(AVSBENCH_CLASSES[1:]) == sorted(AVSBENCH_CLASSES[1:])
    mapping = label2idx()
    assert mapping["background"] == 1 and mapping["accordion"] == 2 and mapping["woman"] == 71
    unknown = np.array([[[1, 2, 3], [128, 0, 0]]], dtype=np.uint8)
    assert colour_to_index(unknown).tolist() == [[0, 1]]


# ---------------------------------------------------------------- unified layout, clean


def test_synthetic_dataset_has_zero_problems_and_the_contract_columns(synth_dir):
    manifest = read_manifest(os.path.join(synth_dir, "manifest.csv"))
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert problems_of(manifest) == []
    assert len(manifest) == 12 and manifest["clip_id"].is_unique
    assert set(zip(manifest.subset, manifest.split)) == {(a, b) for a in ("v1s", "v1m", "v2") for b in ("train", "val", "test")}
    rows_by_uid = {r["uid"]: r for r in metadata_rows(synth_dir)}
    for _, row in manifest.iterrows():
        meta = rows_by_uid[row.clip_id]
        assert (row.vid, row.subset, row.split, row.a_obj) == (meta["vid"], meta["label"], meta["split"], meta["a_obj"])
        n = {"v1s": 5, "v1m": 5, "v2": 10}[row.subset]
        assert int(row.num_frames) == n
        expected_annotated = [0] if (row.subset, row.split) == ("v1s", "train") else list(range(n))
        assert annotated_frames(row) == expected_annotated
        clip_dir = os.path.join(synth_dir, row.subset, row.clip_id)
        assert frame_path(row, n - 1, synth_dir) == os.path.join(clip_dir, "frames", f"{n - 1}.jpg")
        assert sorted(os.listdir(os.path.join(clip_dir, "labels_rgb"))) == sorted(f"{i}.png" for i in expected_annotated)
        assert label_path(row, 0, synth_dir, "rgb") == os.path.join(clip_dir, "labels_rgb", "0.png")
        assert label_path(row, 0, synth_dir, mask_kind(row)) == os.path.join(clip_dir, "labels_semantic", "0.png")
        assert resolve_path(row.audio_path, synth_dir) == os.path.join(clip_dir, "audio.wav")
        assert row.audio_sample_rate in ("16000", "44100", "48000") and float(row.audio_seconds) == n


# ---------------------------------------------------------------- unified layout, faults


def test_injected_faults_yield_exactly_those_problems(synth_dir, tmp_path):
    root = copy_dataset(synth_dir, str(tmp_path / "broken"))
    rows = metadata_rows(root)
    by_subset = {s: [r for r in rows if r["label"] == s] for s in ("v1s", "v1m", "v2")}
    clip = lambda r: os.path.join(root, r["label"], r["uid"])  # noqa: E731

    deleted_frame, truncated, zero_audio, missing_label, bad_png, duplicated = (
        by_subset["v2"][0],
        by_subset["v1m"][0],
        by_subset["v1s"][0],
        by_subset["v2"][1],
        by_subset["v1m"][1],
        by_subset["v1s"][1],
    )
    os.remove(os.path.join(clip(deleted_frame), "frames", "3.jpg"))
    jpg = os.path.join(clip(truncated), "frames", "1.jpg")
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    open(os.path.join(clip(zero_audio), "audio.wav"), "wb").close()
    os.remove(os.path.join(clip(missing_label), "labels_rgb", "2.png"))
    png = os.path.join(clip(bad_png), "labels_semantic", "4.png")
    flipped = bytearray(open(png, "rb").read())
    flipped[len(flipped) // 2] ^= 0xFF
    open(png, "wb").write(bytes(flipped))
    d = duplicated
    append_metadata_lines(
        root,
        [
            ",".join([d["vid"], d["uid"], d["s_min"], d["s_sec"], d["a_obj"], d["split"], d["label"]]),
            "abcdefghijk,abcdefghijk_1,0,5,dog,train,v3",  # unknown subset label
            ",,0,0,dog,val,v2",  # missing vid and uid
        ],
    )
    bad_line = len(rows) + 4  # header + rows + duplicate, then the 1-based line of the missing-uid row

    result = build_avsbench_manifest(root, workers=4)
    assert len(result.manifest) == len(rows) + 3  # nothing dropped
    assert problems_of(result.manifest) == [
        (zero_audio["uid"], "zero-byte audio"),
        (truncated["uid"], "truncated frame 1"),
        (bad_png["uid"], "unreadable semantic label for annotated frame 4"),
        (deleted_frame["uid"], "missing frame 3"),
        (missing_label["uid"], "missing rgb label for annotated frame 2"),
        (d["uid"], "duplicate uid"),
        ("abcdefghijk_1", "bad metadata row: unknown label 'v3' (expected v1s, v1m, v2)"),
        (f"missing-uid-row{bad_line}", "bad metadata row: missing vid; bad metadata row: missing uid"),
    ]
    # the first row of the duplicated uid is the clip and stays good
    first = result.manifest[result.manifest.clip_id == d["uid"]].iloc[0]
    assert first.problem == "" and first.metadata_row != result.manifest.iloc[len(rows)].metadata_row

    # the CLI keeps going, summarises, and fails only under --strict
    out = str(tmp_path / "m.csv")
    relaxed = run_cli("avsbench", root, "-o", out)
    assert relaxed.exit_code == 0, relaxed.output
    assert "total" in relaxed.output and "most common problems" in relaxed.output
    assert f"metadata.csv row {bad_line}: clip missing-uid-row{bad_line}" in relaxed.output
    strict = run_cli("avsbench", root, "-o", out, "--strict")
    assert strict.exit_code == 1
    assert problems_of(read_manifest(out)) == problems_of(result.manifest)


def test_missing_clip_folder_is_one_problem(synth_dir, tmp_path):
    root = copy_dataset(synth_dir, str(tmp_path / "d"))
    row = metadata_rows(root)[-1]
    import shutil

    shutil.rmtree(os.path.join(root, row["label"], row["uid"]))
    assert problems_of(build_avsbench_manifest(root).manifest) == [(row["uid"], "missing clip folder")]


@pytest.mark.parametrize("kind", ["missing column", "not utf-8", "missing column + garbage"])
def test_unusable_metadata_gives_one_line_error_naming_file_and_row(synth_dir, tmp_path, kind):
    root = copy_dataset(synth_dir, str(tmp_path / "d"))
    metadata = os.path.join(root, "metadata.csv")
    lines = open(metadata, "rb").read().split(b"\n")
    if kind.startswith("missing column"):
        lines = [b",".join(line.split(b",")[:6]) for line in lines]  # drop the label column
        expected = [metadata, "row 1", "label"]
    else:
        lines[4] = lines[4].replace(b",", b"\xff,", 1)
        expected = [metadata, "row 5", "UTF-8"]
    if kind.endswith("garbage"):
        lines.insert(0, b"")  # a blank first line: the header is on row 2
        expected[1] = "row 2"
    open(metadata, "wb").write(b"\n".join(lines))
    result = run_cli("avsbench", root, "-o", str(tmp_path / "m.csv"))
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert all(part in message for part in expected), message
    assert not os.path.exists(tmp_path / "m.csv")


def test_filters_and_relative_paths(synth_dir, tmp_path):
    root = copy_dataset(synth_dir, str(tmp_path / "d"))
    append_metadata_lines(root, ["abcdefghijk,abcdefghijk_1,0,5,dog,tran,v2"])  # invalid split: always kept
    out_dir = tmp_path / "elsewhere"
    out = str(out_dir / "m.csv")
    result = run_cli("avsbench", root, "-o", out, "--subset", "v2", "--subset", "v1m", "--split", "val", "--relative")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    good = manifest[manifest.problem == ""]
    assert set(good.subset) == {"v2", "v1m"} and set(good.split) == {"val"}
    expected = [r["uid"] for r in metadata_rows(synth_dir) if r["label"] in ("v2", "v1m") and r["split"] == "val"]
    assert sorted(good.clip_id) == sorted(expected)
    bad = manifest[manifest.problem != ""]
    assert list(bad.clip_id) == ["abcdefghijk_1"] and "unknown split 'tran'" in bad.problem.iloc[0]
    for _, row in good.iterrows():
        assert not os.path.isabs(row.audio_path) and not os.path.isabs(row.frames_dir)
        assert os.path.isfile(resolve_path(row.audio_path, str(out_dir)))
        assert os.path.isfile(frame_path(row, 0, str(out_dir)))
    absolute = build_avsbench_manifest(root, subsets=("v2",)).manifest
    assert all(os.path.isabs(p) for p in absolute.frames_dir if p)


# ---------------------------------------------------------------- AVSBench-object layout


def test_object_layout_maps_to_the_same_columns(synth_dir, tmp_path):
    root = str(tmp_path / "avsbench_data")
    written = make_object_layout(synth_dir, root)
    out = str(tmp_path / "m.csv")
    result = run_cli("avsbench", root, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert problems_of(manifest) == []
    assert sorted(manifest.clip_id) == sorted([r["name"] for r in written["s4"]] + [r["video_id"] for r in written["ms3"]])
    unified = {r["uid"]: r for r in metadata_rows(synth_dir)}
    for _, row in manifest.iterrows():
        source = unified[row.clip_id]
        assert row.subset == source["label"] and row.split == source["split"]
        assert row.vid == source["vid"]  # keyed alike in both layouts (v1m: vid == uid)
        assert row.source_layout == {"v1s": "object-s4", "v1m": "object-ms3"}[row.subset]
        assert row.labels_rgb_dir == "" and row.labels_semantic_dir == ""
        # frame i of the object layout is the same picture as frame i of the unified release
        ours = np.asarray(Image.open(frame_path(row, 4, os.path.dirname(out))), dtype=int)
        theirs = np.asarray(Image.open(os.path.join(synth_dir, row.subset, row.clip_id, "frames", "4.jpg")), dtype=int)
        assert np.array_equal(ours, theirs)
        if row.subset == "v1s":
            assert frame_path(row, 0, "").endswith(f"/{row.clip_id}_1.png") and row.a_obj
        else:
            assert frame_path(row, 0, "").endswith(f"/{row.clip_id}/{row.clip_id}.mp4_1.png")
        for i in annotated_frames(row):
            assert mask_kind(row) == "binary"
            mask = np.asarray(Image.open(label_path(row, i, "", "binary"))) > 0
            semantic = np.asarray(Image.open(os.path.join(synth_dir, row.subset, row.clip_id, "labels_semantic", f"{i}.png"))) > 0
            assert np.array_equal(mask, semantic)
        with pytest.raises(ValueError):
            label_path(row, 0, "", "semantic")
    assert (manifest[(manifest.subset == "v1s") & (manifest.split == "train")].annotated_frames == "0").all()
    assert (manifest[manifest.subset == "v1m"].annotated_frames == "0;1;2;3;4").all()

    # a missing mask and a missing frame in the object layout, and the subset filter
    ms3 = manifest[manifest.subset == "v1m"].iloc[0]
    os.remove(label_path(ms3, 2, "", "binary"))
    s4 = manifest[manifest.subset == "v1s"].iloc[0]
    os.remove(frame_path(s4, 4, ""))
    rebuilt = build_avsbench_manifest(root).manifest
    assert problems_of(rebuilt) == [(s4.clip_id, "missing frame 4"), (ms3.clip_id, "missing binary label for annotated frame 2")]
    only_ms3 = build_avsbench_manifest(root, subsets=("v1m",)).manifest
    assert set(only_ms3.subset) == {"v1m"} and len(only_ms3) == len(written["ms3"])


def test_no_layout_at_root_is_a_clear_error(tmp_path):
    result = run_cli("avsbench", str(tmp_path), "-o", str(tmp_path / "m.csv"))
    assert result.exit_code == 1 and "no metadata.csv" in result.output and len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- file checks


def test_check_image_opens_the_file(tmp_path):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    good_jpg, good_png = str(tmp_path / "a.jpg"), str(tmp_path / "a.png")
    picture.save(good_jpg)
    picture.save(good_png)
    assert check_image(good_jpg) is None and check_image(good_png) is None
    assert check_image(str(tmp_path / "nope.jpg")) == "missing"
    open(tmp_path / "empty.png", "wb").close()
    assert check_image(str(tmp_path / "empty.png")) == "zero-byte"
    jpg = open(good_jpg, "rb").read()
    open(tmp_path / "cut.jpg", "wb").write(jpg[: len(jpg) - 200])
    assert check_image(str(tmp_path / "cut.jpg")) == "truncated"
    open(tmp_path / "text.png", "wb").write(b"not an image at all")
    assert check_image(str(tmp_path / "text.png")) == "unreadable"


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes are a POSIX matter")
def test_a_dataset_under_a_unicode_and_a_non_utf8_folder(synth_dir, tmp_path):
    """A dataset in a folder whose name is not UTF-8 (latin-1 ``é``) beside real unicode: an
    absolute manifest cannot hold its paths (one line saying so and what to do); a relative one
    can, and every clip's audio then reads."""
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + "/caf\xe9 données 日本".encode("latin-1", "ignore") + "日本".encode())
    root = copy_dataset(synth_dir, folder)
    out = os.path.join(folder, "m.csv")
    refused = run_cli("avsbench", root, "-o", out, "--no-progress")
    assert refused.exit_code == 1 and "bug" not in refused.output, refused.output
    assert "not valid UTF-8" in refused.output and "caf\\xe9 donn" in refused.output and "--relative" in refused.output
    assert not os.path.exists(out)
    written = run_cli("avsbench", root, "-o", out, "--no-progress", "--relative")
    assert written.exit_code == 0, written.output
    assert (read_manifest(out).problem == "").all()
    stats = CliRunner().invoke(
        main, ["audio-stats", "--manifest", out, "--cache", os.path.join(folder, "cache"), "--workers", "0", "--no-progress"]
    )
    assert stats.exit_code == 0 and "failed 0" in stats.output, stats.output
