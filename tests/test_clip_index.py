"""The cached clip index (``clip_index.bin``) and reads that do not depend on the part count."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from soundstage.cache import index as index_module
from soundstage.cache.index import INDEX_FILE, clip_index, committed_index
from soundstage.cache.maintenance import compact_stage, merge_shard_parts
from soundstage.cache.reader import open_stage
from soundstage.cache.store import Field, StageDir, field_schema
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import Stage

FIELDS = [
    Field("vec", "float32", (3,)),
    Field("frames", "int16", (None, 2)),
    Field("label", "str"),
    Field("tags", "str", (None,)),
]


def _values(cid: str, version: int = 0) -> dict:
    k = int(cid[1:])
    return {
        "vec": np.array([k, version, -k], np.float32),
        "frames": np.full((k % 4 + 1, 2), k + version, np.int16),
        "label": f"label {cid} v{version}",
        "tags": [f"t{k}", f"v{version}"][: 1 + k % 2],
    }


def _output(tmp_path, parts: int, per_part: int = 3) -> StageDir:
    sd = StageDir(str(tmp_path / "toy" / "fp"))
    meta = {"stage": "toy", "version": 1, "fingerprint": "fp", "fields": field_schema(FIELDS)}
    sd.initialise(meta)
    for p in range(parts):
        rows = [(f"c{p * per_part + r}", _values(f"c{p * per_part + r}")) for r in range(per_part)]
        sd.write_part("w", p, FIELDS, rows, meta, digests=[f"d{cid}" for cid, _ in rows])
    return sd


def _expected(sd: StageDir, version_of=lambda cid: 0) -> dict:
    return {cid: _values(cid, version_of(cid)) for cid in committed_index(sd)}


def _assert_reads(reader, expected: dict) -> None:
    assert sorted(reader) == sorted(expected)
    for cid, want in expected.items():
        got = reader[cid]
        assert np.array_equal(got["vec"], want["vec"]) and np.array_equal(got["frames"], want["frames"])
        assert got["label"] == want["label"] and got["tags"] == want["tags"]


def _count_part_reads(monkeypatch) -> list:
    calls = []
    real = index_module._read_part_info
    monkeypatch.setattr(index_module, "_read_part_info", lambda path, *a: calls.append(path) or real(path, *a))
    return calls


def test_the_index_is_written_once_and_later_opens_read_no_part(tmp_path, monkeypatch):
    sd = _output(tmp_path, parts=5)
    calls = _count_part_reads(monkeypatch)
    _assert_reads(open_stage(sd.path), {f"c{k}": _values(f"c{k}") for k in range(15)})
    assert len(calls) == 5 and os.path.exists(os.path.join(sd.path, INDEX_FILE))
    calls.clear()
    reader = open_stage(sd.path)
    assert calls == [] and len(reader) == 15 and reader.digest("c7") == "dc7"
    assert committed_index(sd, ["c3", "nope"]).keys() == {"c3"} and calls == []


def test_an_unchanged_output_is_looked_up_through_the_mapped_file_without_resolving_anything(tmp_path, monkeypatch):
    sd = _output(tmp_path, parts=4)
    open_stage(sd.path)  # writes the index
    resolved = []
    real = index_module._resolve
    monkeypatch.setattr(index_module, "_resolve", lambda infos: resolved.append(len(infos)) or real(infos))
    index = index_module.clip_index(sd)
    assert resolved == [] and isinstance(index.ids.base, np.ndarray)  # a view of the file's map, not a copy
    found = committed_index(sd, ["c5", "c11", "a-much-longer-id-than-any-committed", ""])
    assert {cid: (v.part, v.row, v.digest) for cid, v in found.items()} == {
        "c5": (os.path.join(sd.parts_dir, "w-00001.h5"), 2, "dc5"),
        "c11": (os.path.join(sd.parts_dir, "w-00003.h5"), 2, "dc11"),
    }
    assert found["c5"].version != found["c11"].version  # written by different commits
    _assert_reads(open_stage(sd.path), {f"c{k}": _values(f"c{k}") for k in range(12)})
    assert resolved == []
    sd.write_part("w", 7, FIELDS, [("c5", _values("c5", 1))], sd.meta(), digests=["again"])
    assert committed_index(sd, ["c5"])["c5"].digest == "again" and resolved == [5]  # changed: resolved once, rewritten
    assert index_module.clip_index(sd).versions(["c5"])["c5"].digest == "again" and resolved == [5]


def test_a_reader_making_many_lookups_holds_the_index_in_memory_not_the_mapped_file(tmp_path):
    sd = _output(tmp_path, parts=3)
    open_stage(sd.path)  # writes the index
    reader = open_stage(sd.path)
    assert not reader._index.ids.flags.owndata  # a view of the file's map
    expected = {f"c{k}": _values(f"c{k}") for k in range(9)}
    for _ in range(4096 // 9 + 2):  # past the lookups answered by binary search
        for cid in expected:
            reader[cid]
    assert reader._lookup is not None
    ix = reader._index
    assert all(a.flags.owndata for a in (ix.ids, ix.part, ix.row, ix.digests, ix.has_digests))
    assert all(arr.flags.owndata for offsets in reader._offsets for arr in offsets.values())
    os.remove(os.path.join(sd.path, INDEX_FILE))  # gone (on NFS: replaced by another node)
    _assert_reads(reader, expected)
    assert reader.digest("c4") == "dc4" and list(reader.lengths("frames", ["c3"])) == [4]


def test_a_format_1_index_file_is_ignored_and_removed_by_the_rewrite(tmp_path):
    sd = _output(tmp_path, parts=2)
    legacy = os.path.join(sd.path, index_module.LEGACY_INDEX_FILE)
    np.savez(legacy, format=np.frombuffer(b"soundstage-clip-index/1", np.uint8))
    _assert_reads(open_stage(sd.path), {f"c{k}": _values(f"c{k}") for k in range(6)})
    assert not os.path.exists(legacy) and os.path.exists(os.path.join(sd.path, INDEX_FILE))


def test_a_new_part_is_read_and_added_the_others_come_from_the_index(tmp_path, monkeypatch):
    sd = _output(tmp_path, parts=3)
    open_stage(sd.path)
    meta = sd.meta()
    sd.write_part("w", 9, FIELDS, [("c100", _values("c100"))], meta, digests=["x"])
    calls = _count_part_reads(monkeypatch)
    reader = open_stage(sd.path)
    assert [os.path.basename(p) for p in calls] == ["w-00009.h5"] and "c100" in reader and len(reader) == 10


def test_a_recomputed_clip_reads_its_newest_version_through_the_index(tmp_path):
    sd = _output(tmp_path, parts=3)
    open_stage(sd.path)  # index written before the recompute
    sd.commit_floor_ns = max(i.committed_ns for i in clip_index(sd).infos) + 1
    sd.write_part("w2", 0, FIELDS, [("c4", _values("c4", 1))], sd.meta(), digests=["new"])
    reader = open_stage(sd.path)
    _assert_reads(reader, _expected(sd, lambda cid: 1 if cid == "c4" else 0))
    assert reader.digest("c4") == "new" and reader.superseded == 1
    assert committed_index(sd)["c4"].digest == "new"


def test_reads_are_right_after_a_compaction_and_the_index_follows_the_new_parts(tmp_path):
    sd = _output(tmp_path, parts=6)
    before = open_stage(sd.path)
    expected = _expected(sd)
    _assert_reads(before, expected)  # maps every old part
    assert compact_stage(sd, 10_000_000, "compact") == (6, 1)
    before._next_look = 0  # the once-a-second look, now
    _assert_reads(before, expected)
    assert [os.path.basename(p) for p in before.parts] == ["compact-00000.h5"]
    infos = clip_index(sd).infos
    assert [i.name for i in infos] == ["compact-00000.h5"]
    _assert_reads(open_stage(sd.path), expected)


def test_a_quarantined_part_drops_out_of_the_index(tmp_path):
    sd = _output(tmp_path, parts=3)
    open_stage(sd.path)
    os.makedirs(os.path.join(sd.path, "quarantine"), exist_ok=True)
    os.rename(os.path.join(sd.parts_dir, "w-00001.h5"), os.path.join(sd.path, "quarantine", "w-00001.h5"))
    reader = open_stage(sd.path)
    assert sorted(reader) == sorted(f"c{k}" for k in (0, 1, 2, 6, 7, 8))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_index_file_or_a_crash_while_writing_it_is_rebuilt_from_the_parts(tmp_path, damage):
    sd = _output(tmp_path, parts=4)
    open_stage(sd.path)
    path = os.path.join(sd.path, INDEX_FILE)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"garbage": b"not an index" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with open(os.path.join(sd.path, f".{INDEX_FILE}.tmp-deadbeef"), "wb") as f:  # a writer killed mid-write
        f.write(data[:100])
    _assert_reads(open_stage(sd.path), {f"c{k}": _values(f"c{k}") for k in range(12)})
    assert index_module._load_index_file(sd)[0].keys() == {f"w-{k:05d}.h5" for k in range(4)}  # rewritten whole


def test_a_read_only_output_is_read_without_writing_an_index(tmp_path):
    sd = _output(tmp_path, parts=2)
    os.chmod(sd.path, 0o555)
    try:
        if os.access(sd.path, os.W_OK):
            pytest.skip("running as a user who can write anyway")
        _assert_reads(open_stage(sd.path), {f"c{k}": _values(f"c{k}") for k in range(6)})
        assert not os.path.exists(os.path.join(sd.path, INDEX_FILE))
    finally:
        os.chmod(sd.path, 0o755)


def test_reading_every_clip_of_many_parts_keeps_no_file_descriptor_open(tmp_path):
    sd = _output(tmp_path, parts=40, per_part=2)
    reader = open_stage(sd.path, fields=["vec", "frames"])
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for cid in reader:
            k = int(cid[1:])
            assert reader[cid]["vec"][0] == k
    assert len(os.listdir("/proc/self/fd")) == fds and len(reader._maps) == 40


def test_a_pickled_reader_maps_lazily_in_the_new_process(tmp_path):
    import pickle

    sd = _output(tmp_path, parts=3)
    reader = open_stage(sd.path)
    _assert_reads(reader, _expected(sd))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps == {} and clone._lookup is None
    _assert_reads(clone, _expected(sd))


# ----------------------------------------------------------------------- runs through the index


def _load_value(row, ctx):
    return {"vec": np.full(3, float(row["value"]), np.float32), "label": row["value"]}


CHEAP = Stage(
    "cheap",
    1,
    fields=[Field("vec", "float32", (3,)), Field("label", "str")],
    load=_load_value,
    reads=("value",),
)


def _manifest(tmp_path, n: int, value=lambda k: k, extra_columns: int = 3) -> str:
    import pandas as pd

    columns = {"clip_id": [f"c{k:03d}" for k in range(n)], "value": [str(value(k)) for k in range(n)]}
    columns.update({f"other{j}": [f"x{j}"] * n for j in range(extra_columns)})
    path = str(tmp_path / "manifest.csv")
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def test_a_run_merges_its_shards_small_parts_and_a_rerun_finds_every_clip_cached(tmp_path):
    manifest, cache = _manifest(tmp_path, 40), str(tmp_path / "cache")
    first = run_stage(CHEAP, manifest, cache, commit_every=2, progress=False)
    assert first.done == 40
    sd = StageDir(first.path)
    assert len(sd.part_paths()) == 1  # 20 parts of 2 clips merged into one
    reader = open_stage(sd.path)
    assert len(reader) == 40 and all(reader[f"c{k:03d}"]["vec"][0] == k for k in range(40))
    again = run_stage(CHEAP, manifest, cache, commit_every=2, progress=False)
    assert (again.done, again.cached, again.stale) == (0, 40, 0)


def test_merging_keeps_only_the_newest_version_of_recomputed_clips(tmp_path):
    manifest, cache = _manifest(tmp_path, 40), str(tmp_path / "cache")
    run_stage(CHEAP, manifest, cache, commit_every=40, progress=False)
    manifest = _manifest(tmp_path, 40, value=lambda k: k + 100 if k % 2 else k)  # half the clips are stale
    again = run_stage(CHEAP, manifest, cache, commit_every=1, progress=False)
    assert (again.done, again.stale, again.cached) == (20, 20, 20)
    sd = StageDir(again.path)
    reader = open_stage(sd.path)
    assert len(sd.part_paths()) == 1 and reader.superseded == 0  # 21 parts merged, older versions dropped
    assert [reader[f"c{k:03d}"]["vec"][0] for k in range(40)] == [k + 100 if k % 2 else k for k in range(40)]
    assert run_stage(CHEAP, manifest, cache, progress=False).cached == 40


def test_merge_shard_parts_touches_only_its_shards_parts(tmp_path):
    manifest, cache = _manifest(tmp_path, 60), str(tmp_path / "cache")
    for i in range(2):
        run_stage(CHEAP, manifest, cache, shard=(i, 2), commit_every=1, progress=False)
    sd = StageDir(run_stage(CHEAP, manifest, cache, shard=(0, 2), progress=False).path)
    names = [os.path.basename(p) for p in sd.part_paths()]
    assert sum(n.startswith("s00000of00002") for n in names) == 1 and sum(n.startswith("s00001of00002") for n in names) == 1
    assert merge_shard_parts(sd, "s00000of00002", "s00000of00002-x", min_parts=1) == 0  # one part: nothing to merge


def test_an_array_task_reads_only_its_columns_and_rows(tmp_path, monkeypatch):
    from soundstage.pipeline import shard as shard_module

    manifest = _manifest(tmp_path, 50, extra_columns=5)
    mine, bad = shard_module.manifest_share(manifest, CHEAP, (1, 4))
    assert bad == [] and mine and all(set(r) == {"clip_id", "value"} for r in mine)
    assert {r["clip_id"] for r in mine} == {f"c{k:03d}" for k in range(50) if shard_module.shard_of(f"c{k:03d}", 4) == 1}
    everything, _ = shard_module.manifest_share(manifest, dataclasses.replace(CHEAP, reads=None), (0, 1))
    assert len(everything) == 50 and len(everything[0]) == 7  # a stage without reads sees every column


def test_jobs_read_the_manifest_once_and_each_process_gets_its_share(tmp_path):
    from soundstage.pipeline.local import run_local

    manifest = _manifest(tmp_path, 30)
    with open(manifest, "a") as f:
        f.write("c005,5,x0,x1,x2\n, 1,x0,x1,x2\n")  # a duplicate and an empty id: each reported once
    summary = run_local(CHEAP, manifest, str(tmp_path / "cache"), {}, jobs=3, progress=False)
    assert summary.done == 30 and sorted(cid for cid, _ in summary.failed) == ["<row 33>", "c005"]
    reader = open_stage(summary.path)
    assert len(reader) == 30 and reader["c017"]["label"] == "17"
    again = run_local(CHEAP, manifest, str(tmp_path / "cache"), {}, jobs=3, progress=False)
    assert again.cached == 30 and again.done == 0


def test_strings_read_from_their_bytes_and_from_parts_written_before_those_existed(tmp_path):
    from soundstage.cache.store import PART_FORMAT, UTF8_GROUP, commit_file, pack_columns, write_part_file

    sd = _output(tmp_path, parts=1)
    meta = sd.meta()
    odd = {"label": "ünïcödé ✓", "tags": ["", "ß", "日本語"]}
    sd.write_part("w", 5, FIELDS, [("u1", {**_values("c1"), **odd}), ("u2", {**_values("c2"), "label": "", "tags": []})], meta)
    columns = {k: v for k, v in pack_columns(FIELDS, [("old", {**_values("c3"), **odd})]).items() if not k.startswith(UTF8_GROUP)}
    tmp = os.path.join(sd.parts_dir, ".tmp-old.h5")
    write_part_file(tmp, columns, {"format": PART_FORMAT, "stage": "toy", "fingerprint": "fp", "committed_ns": 1})
    commit_file(tmp, os.path.join(sd.parts_dir, "old-00000.h5"))
    reader = open_stage(sd.path)
    assert (reader["u1"]["label"], reader["u1"]["tags"]) == (odd["label"], odd["tags"])
    assert (reader["u2"]["label"], reader["u2"]["tags"]) == ("", [])
    assert (reader["old"]["label"], reader["old"]["tags"]) == (odd["label"], odd["tags"])  # through h5py
    assert reader["c1"]["tags"] == _values("c1")["tags"]
