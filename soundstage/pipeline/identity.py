"""Stable identities for the fingerprint: canonical JSON hashing and model identity.

A fingerprint must not change when the cache or a checkpoint moves, or between machines, so a
local model is identified by the hash of its content, not by its path, and a hub model by its
id plus the resolved revision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from soundstage.cache.digest import digest_cache_dir, streamed_hash

_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".txt", ".npy", ".jinja")


def canonical_json(value) -> str:
    """JSON with sorted keys and normalised numbers (1.0 == 1), identical on every machine."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _normalise(value):
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
            return int(value)
        return repr(value)
    if hasattr(value, "item"):  # numpy scalar
        return _normalise(value.item())
    return str(value)


def stable_hash(value, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def file_sha256(path: str) -> str:
    return streamed_hash(path, hashlib.sha256())


# Content hashes of checkpoints are kept per (real path, size, mtime): in memory for the process,
# and on disk for the machine, so a 15 GB model directory is read once, not by every task.
_FILE_HASHES: dict = {}


def cached_file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    record = os.path.join(digest_cache_dir(), hashlib.sha256(repr(key).encode()).hexdigest() + ".json")
    try:
        with open(record, encoding="utf-8") as f:
            stored = json.load(f)
        if tuple(stored["key"]) == key:
            _FILE_HASHES[key] = stored["sha256"]
            return stored["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not recorded yet (or unreadable): hash the file
    digest = _FILE_HASHES[key] = file_sha256(path)
    try:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        tmp = f"{record}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": list(key), "sha256": digest}, f)
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only home: the digest is still right, only not remembered
    return digest


def model_identity(source) -> dict | None:
    """What identifies a model for the fingerprint.

    A local file: its sha256. A local directory: sha256 of the model files in it (names relative
    to the directory). Anything else is taken as a hub id and identified by id + the revision
    resolved from the local hub cache (offline) or the hub; unresolvable ids keep the id alone.
    """
    if source is None or source == "":
        return None
    source = str(source)
    if os.path.isfile(source):
        return {"sha256": cached_file_sha256(source)}
    if os.path.isdir(source):
        files = {}
        for root, _dirs, names in os.walk(source):
            for name in sorted(names):
                if name.endswith(_HASHED_SUFFIXES) and not name.startswith("."):
                    full = os.path.join(root, name)
                    files[os.path.relpath(full, source)] = cached_file_sha256(full)
        if not files:
            raise ValueError(f"model directory {source} holds no model files")
        return {"files": stable_hash(files, 64)}
    if looks_like_local_path(source):  # a typo in a path is not a hub id: say which path is missing
        raise FileNotFoundError(f"no such file or directory: {source}")
    return {"hub_id": source, "revision": _hub_revision(source)}


def looks_like_local_path(source: str) -> bool:
    """A source that cannot be a hub id (``name`` or ``org/name``): it is meant as a local path.
    Absolute paths are left out: a model served by an endpoint may be named by its server's path."""
    if source.startswith((".", "~")) or "\\" in source or (not os.path.isabs(source) and source.count("/") > 1):
        return True
    return source.lower().endswith(_HASHED_SUFFIXES)


def model_source(source, option: str) -> str:
    """``source`` (a folder or a hub id) when it can be loaded here; else a ``FileNotFoundError``
    naming ``option`` and what to do."""
    source = str(source)
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise FileNotFoundError(f"{option} {source}: a file, not a model folder (config.json and weights) or hub id")
    if os.path.isabs(source) or looks_like_local_path(source):
        raise FileNotFoundError(f"{option} {source}: no such folder")
    # not at module level: stage modules import this in every decoding worker, which needs no hub (~80 ms)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        try:
            snapshot_download(source, local_files_only=True)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"{option} {source}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
                f"(HF_HUB_OFFLINE=1); fetch it where there is network with `hf download {source}` (same HF_HOME), "
                "or give a local folder"
            ) from None
    return source


def _hub_revision(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download  # only for hub ids, not local files

        path = snapshot_download(repo_id, local_files_only=True)
        return os.path.basename(os.path.normpath(path))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import HfApi  # network-only: asks the hub for a revision

        return HfApi().model_info(repo_id, timeout=10).sha  # compute nodes are often offline
    except Exception:
        return None
