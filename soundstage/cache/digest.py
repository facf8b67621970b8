"""Input digests: what a committed clip (or a whole-dataset fit) was computed from.

A clip's digest covers

- the manifest cells the stage reads (``Stage.reads``; every column when a stage does not say),
- for each of those columns that names a file (``*_path``) or a directory (``*_dir``): the
  file's size and modification time (ns), or of every entry of the directory; a missing file
  counts as "missing", so creating it later changes the digest too,
- the versions of the upstream clips it consumed, and the content checksum of each whole-dataset
  upstream (e.g. the k-means centroids).

A rerun recomputes the clips whose digest differs from the stored one (``stale``); through the
upstream versions, the clips downstream of a recomputed clip are stale in turn. Size + mtime is
what ``make`` trusts: a file replaced by a copy with the same size and mtime is not noticed.

Where that happens (some network or object-store file systems, tools that restore mtimes),
``SOUNDSTAGE_INPUT_DIGEST=content`` (or ``--input-digest content``, or ``input_digest: content``
in a pipeline file) puts each file's content hash (xxh3-128) in place of its mtime. A file is
hashed once per content: hashes are kept per path, device, inode, size, mtime and ctime (which no
tool can set back: any write changes it) in a SQLite file of this machine (``digest_cache_dir()/input-hashes.sqlite3``), so later runs pay one lookup per
file. Switching the mode changes every digest: the next run recomputes every clip once.

A whole-dataset stage's ``fit_key`` covers the clips it was fitted on: the manifest's clip ids
and the versions of their upstream clips.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sqlite3
import stat

import xxhash

FILE_SUFFIXES = ("_path", "_dir")
INPUT_DIGEST_ENV = "SOUNDSTAGE_INPUT_DIGEST"
INPUT_DIGEST_MODES = ("stat", "content")


def input_digest_mode() -> str:
    """How input files count in digests: ``stat`` (size + mtime, the default) or ``content``."""
    mode = os.environ.get(INPUT_DIGEST_ENV) or "stat"
    if mode not in INPUT_DIGEST_MODES:
        raise ValueError(f"{INPUT_DIGEST_ENV}={mode!r}: expected one of {', '.join(INPUT_DIGEST_MODES)}")
    return mode


def use_input_digest(mode: str | None) -> None:
    """Set the mode for this process and every process it starts (shards, SLURM tasks); None: keep it."""
    if mode:
        if mode not in INPUT_DIGEST_MODES:
            raise ValueError(f"input digest {mode!r}: expected one of {', '.join(INPUT_DIGEST_MODES)}")
        os.environ[INPUT_DIGEST_ENV] = mode


def digest_cache_dir() -> str:
    """Where this machine keeps file digests: $SOUNDSTAGE_DIGEST_CACHE, else
    $XDG_CACHE_HOME/soundstage/digests (default ~/.cache/soundstage/digests)."""
    explicit = os.environ.get("SOUNDSTAGE_DIGEST_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "soundstage", "digests")


def path_stamp(path: str, mode: str = "stat"):
    """[size, mtime_ns] of a file; of a directory, [name, size, mtime_ns] of each entry. With
    ``mode="content"`` the content hash takes the mtime's place."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_size, _mark(path, st, mode)]
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                est = entry.stat()
                entries.append([entry.name, est.st_size, _mark(entry.path, est, mode)])
            except OSError:
                entries.append([entry.name, "unreadable"])
    return sorted(entries)


def _mark(path: str, st: os.stat_result, mode: str):
    if mode != "content" or stat.S_ISDIR(st.st_mode):
        return st.st_mtime_ns
    return "xxh3:" + CONTENT_HASHES.get(path, st)


class ContentHashes:
    """Content hashes of input files, kept per (path, device, inode, size, mtime_ns, ctime_ns) in a SQLite
    file of this machine, so each content is hashed once. The store is only a memo: when it cannot
    be opened or written (read-only home, a locked or network file system), files are hashed
    again by the next process, and the digests are the same."""

    def __init__(self):
        self._db, self._pid, self._pending = None, None, {}

    def _connection(self):
        if self._pid != os.getpid():  # never a connection made before a fork
            self._db, self._pid = None, os.getpid()
            try:
                os.makedirs(digest_cache_dir(), exist_ok=True)
                db = sqlite3.connect(os.path.join(digest_cache_dir(), "input-hashes.sqlite3"), timeout=60)
                db.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER, "
                    "mtime_ns INTEGER, ctime_ns INTEGER, hash TEXT)"
                )
                db.commit()
                self._db = db
            except (OSError, sqlite3.Error):
                self._db = None
        return self._db

    def get(self, path: str, st: os.stat_result) -> str:
        path = os.path.abspath(path)
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in self._pending:
            return self._pending[key]
        db = self._connection()
        if db is not None:
            try:
                row = db.execute(
                    "SELECT hash FROM files WHERE path=? AND dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=?", key
                ).fetchone()
                if row:
                    return row[0]
            except sqlite3.Error:
                pass
        digest = self._pending[key] = file_hash(path)
        if len(self._pending) >= 1000:
            self.flush()
        return digest

    def flush(self) -> None:
        """Store the hashes computed since the last flush (one transaction)."""
        db = self._connection() if self._pending else None
        if db is not None:
            try:
                with db:
                    db.executemany(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", [(*k, h) for k, h in self._pending.items()]
                    )
            except sqlite3.Error:
                pass
        self._pending = {}


def file_hash(path: str) -> str:
    """xxh3-128 of a file's content (hex)."""
    return streamed_hash(path, xxhash.xxh3_128())


def streamed_hash(path: str, digest, block: int = 1 << 20) -> str:
    """``digest`` (a hashlib-like object) fed the file's content in blocks, as hex."""
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


CONTENT_HASHES = ContentHashes()
atexit.register(CONTENT_HASHES.flush)


def _resolve(value: str, manifest_dir: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(manifest_dir, value))


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def clip_digest(row: dict, columns, manifest_dir: str, upstream: dict) -> str:
    """Digest of one clip's inputs. ``columns``: the manifest columns read (None: all);
    ``upstream``: alias -> the consumed upstream clip's digest (or a global upstream's checksum)."""
    names = sorted(row) if columns is None else list(columns)
    cells = {c: str(row.get(c, "")) for c in names}
    mode = input_digest_mode()
    files = {c: path_stamp(_resolve(v, manifest_dir), mode) for c, v in cells.items() if c.endswith(FILE_SUFFIXES) and v}
    return _hash({"cells": cells, "files": files, "upstream": upstream})


def fit_key(clip_digests: dict[str, dict]) -> str:
    """Key of a whole-dataset fit: clip id -> {alias: upstream digest} of every clip it may use."""
    return _hash(sorted(clip_digests.items()))


def result_checksum(attrs: dict) -> str:
    """A whole-dataset result's content, as its stored dataset checksums give it."""
    checksums = attrs.get("checksums", {})
    return _hash(checksums if isinstance(checksums, dict) else json.loads(checksums))
