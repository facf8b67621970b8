"""Input digests: what a committed clip (or a whole-dataset fit) was computed from.

A clip's digest covers

- the manifest cells the stage reads (``Stage.reads``; every column when a stage does not say),
- for each of those columns that names a file (``*_path``) or a directory (``*_dir``): the
  file's size and modification time (ns), or of every entry of the directory; a missing file
  counts as "missing", so creating it later changes the digest too,
- the digests of the upstream clips it consumed, and the content checksum of each whole-dataset
  upstream (e.g. the k-means centroids).

A rerun recomputes the clips whose digest differs from the stored one (``stale``); through the
upstream digests, the clips downstream of a recomputed clip are stale in turn. Size + mtime is
what ``make`` trusts: a file replaced by a copy with the same size and mtime is not noticed.

A whole-dataset stage's ``fit_key`` covers the clips it was fitted on: the manifest's clip ids
and each one's upstream digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

FILE_SUFFIXES = ("_path", "_dir")


def path_stamp(path: str):
    """[size, mtime_ns] of a file; of a directory, [name, size, mtime_ns] of each entry."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_size, st.st_mtime_ns]
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                est = entry.stat()
                entries.append([entry.name, est.st_size, est.st_mtime_ns])
            except OSError:
                entries.append([entry.name, "unreadable"])
    return sorted(entries)


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
    files = {c: path_stamp(_resolve(v, manifest_dir)) for c, v in cells.items() if c.endswith(FILE_SUFFIXES) and v}
    return _hash({"cells": cells, "files": files, "upstream": upstream})


def fit_key(clip_digests: dict[str, dict]) -> str:
    """Key of a whole-dataset fit: clip id -> {alias: upstream digest} of every clip it may use."""
    return _hash(sorted(clip_digests.items()))


def result_checksum(attrs: dict) -> str:
    """A whole-dataset result's content, as its stored dataset checksums give it."""
    checksums = attrs.get("checksums", {})
    return _hash(checksums if isinstance(checksums, dict) else json.loads(checksums))
