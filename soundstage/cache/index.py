"""Which version of each clip an output holds: the clip index of its committed parts.

A clip may be in several parts: recomputed because its inputs changed (stale), or twice for an
instant while compaction replaces parts. The newest version wins: parts are ordered by their
``committed_ns`` attribute (commit time; 0 for parts written before it was recorded) and then
by name. Each part stores per clip the digest of its inputs (``/input_digest``; absent in parts
written before digests were recorded).

Every error names the part file. A part that vanishes while the index is read (compaction
replaced it) makes the scan start again: compaction commits the merged part before it removes
the old ones, so a fresh listing always holds every clip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from soundstage.cache.quarantine import CorruptPart, load_verdicts, repair_hint, verdict
from soundstage.cache.store import CacheError, StageDir, h5py

DIGEST_DATASET = "input_digest"


class UnreadablePart(CacheError):
    """A committed part whose header or index cannot be read (truncated, overwritten, ...)."""


@dataclass
class PartHeader:
    path: str
    committed_ns: int
    ids: list
    digests: list | None  # per clip, None for parts written before digests were recorded


@dataclass(frozen=True)
class ClipVersion:
    part: str  # path of the part holding the newest version
    row: int
    digest: str | None


def read_header(h5, path: str) -> PartHeader:
    """Clip ids, input digests and commit time of an open part file."""
    ids = h5["clip_id"].asstr()[...].tolist()
    digests = [d or None for d in h5[DIGEST_DATASET].asstr()[...].tolist()] if DIGEST_DATASET in h5 else None
    return PartHeader(path, int(h5.attrs.get("committed_ns", 0)), ids, digests)


def unreadable(path: str, error: Exception) -> UnreadablePart:
    return UnreadablePart(f"{path}: unreadable part file ({type(error).__name__}: {error}); {repair_hint(path)}")


def part_headers(sd: StageDir, attempts: int = 20) -> list[PartHeader]:
    """Headers of the committed parts, oldest commit first (see the module docstring)."""
    for _ in range(attempts):
        headers = []
        try:
            for path in sd.part_paths():
                try:
                    with h5py.File(path, "r") as h5:
                        headers.append(read_header(h5, path))
                except FileNotFoundError:
                    raise
                except Exception as e:
                    if not os.path.exists(path):
                        raise FileNotFoundError(path) from None
                    raise unreadable(path, e) from None
        except FileNotFoundError:
            continue  # replaced by compaction while we listed: list again
        return sorted(headers, key=lambda h: (h.committed_ns, os.path.basename(h.path)))
    raise CacheError(f"{sd.parts_dir}: parts keep changing while the index is read")


def newest_versions(headers: list[PartHeader]) -> dict[str, ClipVersion]:
    index = {}
    for h in headers:  # oldest first: later versions replace earlier ones
        for row, cid in enumerate(h.ids):
            index[cid] = ClipVersion(h.path, row, h.digests[row] if h.digests is not None else None)
    return index


def committed_index(sd: StageDir) -> dict[str, ClipVersion]:
    """clip id -> its newest committed version. Refuses (naming the files) an output with parts
    that ``verify`` found bad and that are not quarantined yet."""
    headers = part_headers(sd)
    sd.commit_floor_ns = max([sd.commit_floor_ns, *(h.committed_ns + 1 for h in headers)])
    verdicts = load_verdicts(sd)
    bad = {h.path: problems for h in headers if (problems := verdict(verdicts, h.path))}
    if bad:
        listing = "; ".join(f"{p}: {', '.join(v[:2])}" for p, v in bad.items())
        raise CorruptPart(f"{len(bad)} part(s) failed verification — {listing}; {repair_hint(next(iter(bad)))}")
    return newest_versions(headers)


def has_results(sd: StageDir) -> bool:
    """Whether the output holds anything committed (a part, or a whole-dataset result)."""
    return os.path.exists(sd.result_path) or bool(sd.part_paths())
