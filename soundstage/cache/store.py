"""Stage directories and part files.

Layout of one stage output::

    <cache>/<stage>/<fingerprint>/
        stage.json                      what the fingerprint was made of, field schema, versions
        parts/<writer>-<seq>.h5         committed parts (column-wise, many clips each)
        parts/.tmp-*.h5                 a part being written; never read, removed on recovery
        failures/<writer>.jsonl         one JSON line per failed clip: clip_id, cause, time
        locks/shard-<i>-of-<n>.lock     held (flock) by the writer of that shard
        result.h5                       whole-dataset stages only (e.g. k-means centroids)

Part file schema (plain h5py / h5ls can read it):

    /clip_id            vlen UTF-8 [n]                   clip ids, in row order
    /<field>            [n, *shape]                      fixed-shape field, one row per clip
    /<field>            [sum of lengths, *shape[1:]]     ragged field, clips concatenated
    /offsets/<field>    int64 [n + 1]                    clip k is rows offsets[k]:offsets[k+1]
    /input_digest       vlen UTF-8 [n]                   digest of the inputs each clip was computed from
    /utf8/<field>       uint8 [bytes]                    a string field's strings, UTF-8, concatenated
    /utf8/offsets/<field> int64 [strings + 1]            string k is bytes offsets[k]:offsets[k+1]
    /version            vlen UTF-8 [n]                   a new id each time a clip is computed (what downstream keys on)
    attrs: format, stage, fingerprint, fields (JSON schema), checksums (JSON: dataset -> sha256),
           created, committed_ns (commit time: the newest version of a clip wins), soundstage_version
    user block          the first 512 bytes (HDF5 skips them): the xxh3-128 of the rest of the file,
                        checked the first time anything reads the part (``soundstage.cache.integrity``)

A part is committed when it has its final name: it is written under a temporary name, flushed,
closed, fsynced and renamed, and the directory is fsynced. HDF5 has no journal, so this is what
makes ``kill -9`` harmless.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from dataclasses import fields as dataclass_fields

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # parts are immutable once renamed

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from soundstage import __version__  # noqa: E402
from soundstage.cache.checksum import USERBLOCK_BYTES, stamp_file_checksum  # noqa: E402
from soundstage.cache.schema import Field, field_schema, fields_from_schema  # noqa: E402,F401

PART_FORMAT = "soundstage-part/1"
UTF8_GROUP = "utf8"  # string fields again as bytes + offsets, for memory-mapped reads
STR_DTYPE = h5py.string_dtype("utf-8")


class CacheError(RuntimeError):
    pass


class ShardLocked(CacheError):
    pass


# ----------------------------------------------------------------------------------- helpers


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def array_checksum(values) -> str:
    """sha256 of a dataset's content: raw bytes for numbers, NUL-joined UTF-8 for strings."""
    digest = hashlib.sha256()
    if isinstance(values, np.ndarray) and values.dtype != object:
        digest.update(str(values.dtype).encode())
        digest.update(str(values.shape).encode())
        digest.update(np.ascontiguousarray(values))  # hashed in place: no bytes copy of the array
    else:
        _update_with_strings(digest, values)
    return digest.hexdigest()


def _update_with_strings(digest, values) -> None:
    for v in values:
        digest.update((v.decode() if isinstance(v, bytes) else str(v)).encode("utf-8"))
        digest.update(b"\0")


def dataset_checksum(ds, block_bytes: int = 16 << 20) -> str:
    """``array_checksum`` of an HDF5 dataset, read in blocks of rows: memory stays at one block
    however large the part (verify and compaction checksum whole parts)."""
    digest = hashlib.sha256()
    strings = h5py.check_string_dtype(ds.dtype) is not None
    if not strings:
        digest.update(str(ds.dtype).encode())
        digest.update(str(ds.shape).encode())
    if not ds.shape or ds.shape[0] == 0:
        if not strings and ds.size:
            digest.update(np.ascontiguousarray(ds[()]))
        return digest.hexdigest()
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
    step = max(1, block_bytes // (row_bytes if not strings else 64))
    for start in range(0, ds.shape[0], step):
        if strings:
            _update_with_strings(digest, ds.asstr()[start : start + step])
        else:
            digest.update(np.ascontiguousarray(ds[start : start + step]))
    return digest.hexdigest()


# ------------------------------------------------------------------------------ conversion


def coerce_value(field: Field, value):
    """Check one clip's value against its field declaration; returns the array (or str) to store."""
    if field.dtype == "str":
        if field.ragged:
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"field {field.name}: expected a list of str")
            return [str(v) for v in value]
        if not isinstance(value, str):
            raise TypeError(f"field {field.name}: expected str, got {type(value).__name__}")
        return value
    if hasattr(value, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through float32)
        value = value.detach().cpu()
        value = value.float().numpy() if value.dtype.is_floating_point else value.numpy()
    arr = np.asarray(value)
    if arr.ndim != len(field.shape):
        raise ValueError(f"field {field.name}: expected {len(field.shape)} dims {field.shape}, got shape {arr.shape}")
    for want, got in zip(field.shape, arr.shape):
        if want is not None and want != got:
            raise ValueError(f"field {field.name}: expected shape {field.shape}, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and field.dtype != "bool" and not np.isfinite(arr).all():
        raise ValueError(f"field {field.name}: contains NaN or Inf")
    return arr.astype(field.dtype, copy=False)


def _create(h5: h5py.File, name: str, data) -> None:
    # Numbers are stored contiguous and unfiltered: parts are immutable, so readers memory-map
    # them and a clip is one slice (float16 features barely compress, and chunked+filtered
    # datasets made random per-clip reads ~20x slower; see benchmarks/README.md).
    if isinstance(data, np.ndarray) and data.dtype != object:
        h5.create_dataset(name, data=data)
    else:
        h5.create_dataset(name, data=np.array(list(data), dtype=object), dtype=STR_DTYPE)


def pack_columns(fields: list[Field], rows: list[tuple[str, dict]]) -> dict:
    """Clip results -> column arrays (and offsets for ragged fields), keyed by dataset path."""
    columns = {"clip_id": [cid for cid, _ in rows]}
    for f in fields:
        values = [res[f.name] for _, res in rows]
        if f.ragged:
            lengths = [len(v) for v in values]
            columns[f"offsets/{f.name}"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            if f.dtype == "str":
                columns[f.name] = [s for v in values for s in v]
            elif values:
                columns[f.name] = np.concatenate(values, axis=0).astype(f.dtype, copy=False)
            else:
                columns[f.name] = np.zeros((0, *(d or 0 for d in f.shape[1:])), dtype=f.dtype)
        elif f.dtype == "str":
            columns[f.name] = values
        else:
            columns[f.name] = np.stack(values).astype(f.dtype) if values else np.zeros((0, *(d or 0 for d in f.shape)), f.dtype)
        if f.dtype == "str":
            columns.update(utf8_columns(f.name, columns[f.name]))
    return columns


def utf8_columns(name: str, strings: list[str]) -> dict:
    """A string field again as one UTF-8 byte array and int64 offsets (string k is bytes
    ``offsets[k]:offsets[k+1]``): contiguous numbers, so readers memory-map them like features
    instead of opening each part with h5py for its strings (what a reader's first touch of a part
    cost). The variable-length dataset stays for h5py/h5ls users."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    return {
        f"{UTF8_GROUP}/{name}": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        f"{UTF8_GROUP}/offsets/{name}": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }


def write_part_file(path: str, columns: dict, attrs: dict) -> None:
    """Write ``columns`` into a new HDF5 file at ``path`` (not atomic by itself)."""
    checksums = {}
    with h5py.File(path, "w", libver="latest", userblock_size=USERBLOCK_BYTES) as h5:
        for name, data in columns.items():
            _create(h5, name, data)
            checksums[name] = array_checksum(np.asarray(data) if isinstance(data, np.ndarray) else data)
        for key, value in attrs.items():
            h5.attrs[key] = value
        h5.attrs["checksums"] = json.dumps(checksums, sort_keys=True)
        h5.flush()
    stamp_file_checksum(path)


def commit_file(tmp_path: str, final_path: str) -> None:
    """fsync the finished temp file, rename it into place and fsync the directory."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_path, final_path)
    fsync_dir(os.path.dirname(final_path))


# ----------------------------------------------------------------------------- stage dir


RESULT_FORMAT = "soundstage-result/1"


@dataclass(frozen=True)
class StageMeta:
    """What stage.json holds, typed: written once when an output is planned."""

    stage: str
    version: int
    fingerprint: str
    kind: str = "per_clip"  # or "global": one result for the whole dataset (result.h5)
    params: dict = dataclass_field(default_factory=dict)  # fingerprinted parameters as given
    upstream: dict = dataclass_field(default_factory=dict)  # alias -> {"stage", "fingerprint"}
    fields: list = dataclass_field(default_factory=list)  # field schema (``field_schema``)
    fingerprint_payload: dict = dataclass_field(default_factory=dict)  # what the fingerprint hashes
    soundstage_version: str = ""
    metadata: dict | None = None  # facts about the model recorded by the run (``set_metadata``)

    @property
    def whole_dataset(self) -> bool:
        return self.kind == "global"

    @classmethod
    def from_dict(cls, data: dict) -> StageMeta:
        known = {f.name for f in dataclass_fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class StageStatus:
    """How an output stands for the clips asked about (``soundstage.cache.index.output_status``): the one answer to
    "what is done, what failed, what is left" for runs, launches, ``status`` and the demo."""

    whole_dataset: bool
    clip_ids: tuple  # the clips asked about, in order (per-clip outputs)
    done: frozenset  # of clip_ids: committed
    failed: dict  # of clip_ids, not committed: clip id -> latest failure record
    fitted: bool = False  # whole-dataset outputs: result.h5 is there

    @property
    def todo(self) -> list:
        """Clips still to compute, in order (failed ones included: a rerun tries them again)."""
        return [] if self.whole_dataset else [c for c in self.clip_ids if c not in self.done]

    @property
    def never_tried(self) -> int:
        return len(self.todo) - len(self.failed)

    @property
    def complete(self) -> bool:
        return self.fitted if self.whole_dataset else len(self.done) == len(self.clip_ids)


class StageDir:
    """One stage output directory: ``<cache>/<stage>/<fingerprint>/``."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        # parts written through this object get a commit time above this (set when the committed
        # index is read), so a recomputed clip is newer than the version it replaces even when
        # the clocks of the nodes that wrote them disagree
        self.commit_floor_ns = 0

    @classmethod
    def at(cls, cache_root: str, stage: str, fingerprint: str) -> StageDir:
        return cls(os.path.join(cache_root, stage, fingerprint))

    # -- paths
    @property
    def parts_dir(self) -> str:
        return os.path.join(self.path, "parts")

    @property
    def failures_dir(self) -> str:
        return os.path.join(self.path, "failures")

    @property
    def locks_dir(self) -> str:
        return os.path.join(self.path, "locks")

    @property
    def result_path(self) -> str:
        return os.path.join(self.path, "result.h5")

    @property
    def meta_path(self) -> str:
        return os.path.join(self.path, "stage.json")

    # -- metadata
    def exists(self) -> bool:
        return os.path.exists(self.meta_path)

    def meta(self) -> dict:
        with open(self.meta_path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except ValueError as e:  # name the file: json's message does not
                raise CacheError(f"{self.meta_path}: unreadable ({e})") from None

    def stage_meta(self) -> StageMeta:
        return StageMeta.from_dict(self.meta())

    def write_result(self, arrays: dict, attrs: dict) -> None:
        """Commit a whole-dataset result (``result.h5``) atomically, replacing an earlier one."""
        tmp = self.result_path + f".tmp-{uuid.uuid4().hex[:8]}"
        meta = self.meta()
        write_part_file(
            tmp,
            arrays,
            {
                "format": RESULT_FORMAT,
                "stage": meta["stage"],
                "fingerprint": meta["fingerprint"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "soundstage_version": __version__,
                **attrs,
            },
        )
        commit_file(tmp, self.result_path)

    def fields(self) -> list[Field]:
        return fields_from_schema(self.meta()["fields"])

    def initialise(self, meta: dict) -> None:
        """Create the directory and stage.json once; later runs check they agree."""
        for d in (self.path, self.parts_dir, self.failures_dir, self.locks_dir):
            os.makedirs(d, exist_ok=True)
        if self.exists():
            old = self.meta()
            if old.get("fingerprint") != meta["fingerprint"]:
                raise CacheError(f"{self.meta_path} belongs to fingerprint {old.get('fingerprint')}, not {meta['fingerprint']}")
            return
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def set_metadata(self, metadata: dict) -> None:
        """Record facts about the model beside the fingerprint (idempotent; shards agree)."""
        meta = self.meta()
        if meta.get("metadata") != metadata:
            meta["metadata"] = metadata
            atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    # -- parts
    def part_paths(self) -> list[str]:
        if not os.path.isdir(self.parts_dir):
            return []
        names = sorted(n for n in os.listdir(self.parts_dir) if n.endswith(".h5") and not n.startswith("."))
        return [os.path.join(self.parts_dir, n) for n in names]

    def committed_ids(self) -> set[str]:
        """Every committed clip id, read from the parts (``soundstage.cache.index.committed_index``
        answers from the cached clip index instead)."""
        done = set()
        for path in self.part_paths():
            try:
                with h5py.File(path, "r") as h5:
                    done.update(h5["clip_id"].asstr()[...].tolist())
            except Exception as e:  # name the file: h5py's message does not
                raise CacheError(
                    f"{path}: unreadable part file ({type(e).__name__}: {e}); run `soundstage verify "
                    f"--repair {self.path}` to move it to quarantine/"
                ) from None
        return done

    def write_part(
        self,
        writer_id: str,
        seq: int,
        fields: list[Field],
        rows: list[tuple[str, dict]],
        meta: dict,
        digests: list[str] | None = None,
        versions: list[str] | None = None,
    ) -> str:
        """Commit ``rows`` as one part; ``digests``: per clip, the digest of its inputs ("" unknown);
        ``versions``: per clip, its version id (compaction keeps them; default: a new one, the
        clips were just computed)."""
        columns = pack_columns(fields, rows)
        if digests is not None:
            columns["input_digest"] = [d or "" for d in digests]
        columns["version"] = [v or "" for v in versions] if versions is not None else [uuid.uuid4().hex[:16]] * len(rows)
        final = os.path.join(self.parts_dir, f"{writer_id}-{seq:05d}.h5")
        tmp = os.path.join(self.parts_dir, f".tmp-{writer_id}-{seq:05d}.h5")
        attrs = {
            "format": PART_FORMAT,
            "stage": meta["stage"],
            "fingerprint": meta["fingerprint"],
            "fields": json.dumps(field_schema(fields)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "committed_ns": max(time.time_ns(), self.commit_floor_ns),  # orders versions of a clip: the newest wins
            "soundstage_version": __version__,
        }
        write_part_file(tmp, columns, attrs)
        commit_file(tmp, final)
        return final

    def remove_stale_temp_files(self, writer_prefix: str) -> int:
        """Temp parts of this shard's earlier, killed writers (we hold the shard lock)."""
        removed = 0
        for name in os.listdir(self.parts_dir):
            if name.startswith(f".tmp-{writer_prefix}"):
                os.remove(os.path.join(self.parts_dir, name))
                removed += 1
        return removed

    # -- failures
    def record_failure(self, writer_id: str, clip_id: str, cause: str, detail: str = "", withdraws: str | None = None) -> None:
        """Record that ``clip_id`` failed; ``withdraws``: the key of its committed version that
        this makes not current (its inputs changed since; ``soundstage.cache.index.withdrawn_versions``)."""
        self.record_failures(writer_id, [(clip_id, cause, detail, withdraws)])

    def record_failures(self, writer_id: str, failures: list[tuple]) -> None:
        """Several (clip_id, cause, detail, withdraws) records with one fsync."""
        if not failures:
            return
        now = time.time()
        lines = []
        for clip_id, cause, detail, withdraws in failures:
            record = {"clip_id": clip_id, "cause": cause, "detail": detail, "time": now}
            if withdraws:
                record["withdraws"] = withdraws
            lines.append(json.dumps(record) + "\n")
        path = os.path.join(self.failures_dir, f"{writer_id}.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def merge_failure_records(self, writer_prefix: str, keep: str, committed) -> int:
        """Fold the failure records of a shard's earlier writers (``writer_prefix``; we hold its
        lock) into one file: the latest record per clip, none for clips committed since. So
        records do not grow with reruns. ``keep``: this writer's own file, left alone;
        ``committed``: clip id -> committed version (``ClipVersion``) of the shard's clips; a
        record that withdraws the committed version is kept (the clip is still not current). The merged
        file replaces the old one atomically before the others are removed (a crash leaves a
        record twice at worst; the latest wins). Returns the records kept (0: nothing to fold)."""
        names = [
            n
            for n in (os.listdir(self.failures_dir) if os.path.isdir(self.failures_dir) else [])
            if n.startswith(f"{writer_prefix}-") and n.endswith(".jsonl") and n != keep
        ]
        merged_name = f"{writer_prefix}-merged.jsonl"
        if not names or names == [merged_name]:
            return 0
        latest = _latest_records(os.path.join(self.failures_dir, n) for n in sorted(names))
        lines = [
            json.dumps(rec)
            for cid, rec in latest.items()
            if cid not in committed or (rec.get("withdraws") and rec["withdraws"] == committed[cid].key)
        ]
        atomic_write_text(os.path.join(self.failures_dir, merged_name), "".join(line + "\n" for line in lines))
        for n in names:
            if n != merged_name:
                os.remove(os.path.join(self.failures_dir, n))
        fsync_dir(self.failures_dir)
        return len(lines)

    def failures(self) -> dict[str, dict]:
        """Latest failure record per clip id. A clip committed since is not failed, unless the record
        withdraws its committed version (``soundstage.cache.index.withdrawn_versions``)."""
        if not os.path.isdir(self.failures_dir):
            return {}
        names = sorted(n for n in os.listdir(self.failures_dir) if n.endswith(".jsonl"))
        return _latest_records(os.path.join(self.failures_dir, n) for n in names)

    # -- locks
    def lock(self, name: str) -> ShardLock:
        return ShardLock(os.path.join(self.locks_dir, f"{name}.lock"))


def _latest_records(paths) -> dict[str, dict]:
    """The latest failure record per clip id in the JSON-lines files ``paths``."""
    out: dict[str, dict] = {}
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except FileNotFoundError:  # merged away by the shard's writer meanwhile
            continue
        with f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half-written last line of a killed writer
                if rec["clip_id"] not in out or rec["time"] >= out[rec["clip_id"]]["time"]:
                    out[rec["clip_id"]] = rec
    return out


class PartWriter:
    """One writer's finished clips: validated against the fields, buffered, and committed as a
    part every ``commit_every`` clips or ``commit_seconds`` (and on ``commit``)."""

    def __init__(
        self,
        sd: StageDir,
        writer_id: str,
        fields: list[Field],
        meta: dict,
        commit_every: int = 256,
        commit_seconds: float = 120.0,
    ):
        self.dir, self.writer_id, self.fields, self.meta = sd, writer_id, fields, meta
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.rows: list = []
        self.digests: list = []
        self.sizes: dict = {}  # field -> trailing shape fixed at run time
        self.seq = 0
        self.committed = 0
        self.last_commit = time.monotonic()

    def validate(self, result: dict) -> dict:
        """One clip's values, checked and converted to what is stored (``ValueError``/``TypeError`` if not)."""
        missing = [f.name for f in self.fields if f.name not in result]
        if missing:
            raise ValueError(f"stage returned no value for field(s) {missing}")
        return {f.name: coerce_value(f, result[f.name]) for f in self.fields}

    def check_run_time_sizes(self, values: dict) -> None:
        """Sizes declared None past the first axis are fixed by the first clip, for every clip."""
        for f in self.fields:
            if f.dtype == "str" or not any(d is None for d in f.shape[1:]):
                continue
            got = tuple(np.shape(values[f.name])[1:])
            want = self.sizes.setdefault(f.name, got)
            if got != want:
                raise ValueError(f"field {f.name}: trailing shape {got} differs from {want} of earlier clips")

    def add(self, clip_id: str, values: dict, digest: str | None = None) -> None:
        self.rows.append((clip_id, values))
        self.digests.append(digest)
        if len(self.rows) >= self.commit_every or time.monotonic() - self.last_commit >= self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        if self.rows:
            self.dir.write_part(self.writer_id, self.seq, self.fields, self.rows, self.meta, digests=self.digests)
            self.seq += 1
            self.committed += len(self.rows)
            self.rows, self.digests = [], []
        self.last_commit = time.monotonic()


class ShardLock:
    """An exclusive flock on a lock file; released by the kernel if the holder dies."""

    def __init__(self, path: str):
        self.path = path
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ShardLocked(
                    f"another writer holds {self.path} ({holder}); a shard has one writer at a time: "
                    "wait for it to finish or stop it"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def iter_stage_dirs(cache_root: str, stage: str | None = None):
    """Every stage output under ``cache_root`` (optionally of one stage), as StageDir."""
    if not os.path.isdir(cache_root):
        return
    stages = [stage] if stage else sorted(os.listdir(cache_root))
    for name in stages:
        base = os.path.join(cache_root, name)
        if not os.path.isdir(base):
            continue
        for fp in sorted(os.listdir(base)):
            if fp.startswith("."):  # an output being removed (or left half-removed by an interrupted rm)
                continue
            sd = StageDir(os.path.join(base, fp))
            if sd.exists():
                yield sd
