"""A whole-file checksum in each part's HDF5 user block, so a part is checked by hashing it.

Parts and whole-dataset results are written with a 512-byte HDF5 user block (HDF5, h5py and
``h5ls`` skip it). Once the file is complete, the xxh3-128 of everything after the user block is
written into it, before the file is fsynced and renamed into place. Checking a part is then one
pass of a hash that runs at memory speed over the mapped file: no HDF5 call, and every byte
(data, offsets, strings, HDF5's own metadata) is covered. The per-dataset sha256 checksums in the
``checksums`` attribute stay: ``verify`` uses them to say which dataset is damaged.

Files written before this have no user block (they start with the HDF5 signature) and are
checked through their dataset checksums instead.
"""

from __future__ import annotations

import os

import numpy as np
import xxhash

from soundstage.cache.mapping import map_readonly

USERBLOCK_BYTES = 512
MAGIC = b"soundstage-file-checksum xxh3_128 "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def file_checksum(path: str, data: np.ndarray | None = None) -> str:
    """xxh3-128 (hex) of the file's bytes after the user block (``data``: the file, mapped already)."""
    data = map_readonly(path) if data is None else data
    return xxhash.xxh3_128_hexdigest(data[USERBLOCK_BYTES:])


def stamp_file_checksum(path: str) -> None:
    """Write the checksum of the finished file at ``path`` into its user block."""
    header = MAGIC + file_checksum(path).encode() + b"\n"
    with open(path, "r+b") as f:
        f.write(header.ljust(USERBLOCK_BYTES, b"\0"))


def file_problems(path: str, data: np.ndarray | None = None) -> list[str] | None:
    """[] when the file matches its stored checksum, the problem otherwise; None for a file
    written before checksums were stored in the user block. ``data``: the file, mapped already."""
    data = map_readonly(path) if data is None else data
    head = bytes(data[:USERBLOCK_BYTES])
    name = os.path.basename(path)
    if head.startswith(HDF5_SIGNATURE):
        return None
    if not head.startswith(MAGIC):
        return [f"{name}: its header (the user block holding the file checksum) is damaged"]
    stored = head[len(MAGIC) : len(MAGIC) + 32].decode("ascii", "replace")
    if len(data) <= USERBLOCK_BYTES:
        return [f"{name}: truncated"]
    return (
        []
        if file_checksum(path, data) == stored
        else [f"{name}: file checksum mismatch (its bytes changed since it was written)"]
    )
