"""Which committed clips still hold: input digests against what is stored.

A clip is reused only when the digest of its inputs now (``soundstage.cache.digest``: the
manifest cells the stage reads, the size and mtime of the files they name, the versions of the
upstream clips it read) equals the digest stored with it, and its version was not withdrawn (a
failure record says its inputs changed and it was not recomputed). An upstream clip's version is
a new id each time it is computed (``soundstage.cache.index``), so a recomputed upstream clip
makes the clips and fits computed from it stale even when its own inputs did not change (e.g.
after ``verify --repair`` and a rerun). Clips stored before digests were recorded have none:
they are trusted as they are (recomputing a whole cache on upgrade would cost more than it
protects against; ``--force`` recomputes them) and the summary counts them; upstream clips stored
before versions were recorded stand for themselves by their input digest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from soundstage.cache.digest import CONTENT_HASHES, clip_digest, fit_key, result_checksum
from soundstage.cache.index import ClipVersion, committed_index, has_results
from soundstage.cache.reader import open_stage
from soundstage.cache.store import StageDir, h5py


@dataclass
class Selection:
    todo: list = field(default_factory=list)  # rows to compute
    cached: int = 0  # committed with the same inputs (or trusted: no digest)
    stale: int = 0  # committed, but their inputs changed since (or their version was withdrawn)
    withdraw: dict = field(default_factory=dict)  # clip id -> key of its committed version that is not current
    undigested: int = 0  # trusted although committed before digests were recorded


def upstream_readers(plan) -> dict:
    """alias -> the upstream output as ``open_stage`` gives it (what ``load``/``fit`` read)."""
    return {alias: open_stage(sd.path) for alias, sd in plan.upstream.items()}


def _readers_of(sd: StageDir, meta: dict | None) -> dict | None:
    """The upstream readers an existing output was planned with; None while one has nothing yet."""
    root = os.path.dirname(os.path.dirname(sd.path))
    readers = {}
    for alias, u in (meta or sd.meta()).get("upstream", {}).items():
        up = StageDir.at(root, u["stage"], u["fingerprint"])
        if not has_results(up):
            return None
        readers[alias] = open_stage(up.path)
    return readers


#: what ``outdated`` holds for a whole-dataset output whose fit is stale (it has no clips)
STALE_RESULT = "<result>"


def outdated(stage, sd: StageDir, rows: list[dict], manifest_dir: str, meta: dict | None = None) -> set[str]:
    """Clip ids of ``rows`` committed in ``sd`` whose inputs changed since (``{STALE_RESULT}`` for a
    whole-dataset result fitted on other clips): what a run would recompute though it is committed."""
    if not sd.exists() or not has_results(sd):
        return set()
    readers = _readers_of(sd, meta)
    if readers is None:
        return set()
    if stage.kind == "global":
        stored_key, _ = stored_fit(sd.result_path)
        return set() if stored_key == current_fit_key(rows, readers) else {STALE_RESULT}
    digests = clip_digests(stage.reads, manifest_dir, rows, readers)
    return {cid for cid, v in committed_index(sd, digests).items() if v.digest is not None and digests[cid] != v.digest}


def stored_fit(path: str) -> tuple[str | None, int]:
    """(fit key, number of clips) a whole-dataset result was fitted on (None, -1: not recorded)."""
    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("fit_key"), int(h5.attrs.get("fit_clips", -1))
    except OSError as e:
        raise OSError(f"{path}: unreadable result ({e}); run `soundstage verify --repair {os.path.dirname(path)}`") from None


def _upstream_digest(reader, clip_id: str) -> str:
    if isinstance(reader, dict):  # a whole-dataset result: its content
        return result_checksum(reader["attrs"])
    if clip_id not in reader:  # not computed, failed, or withdrawn (not current)
        return "missing"
    return reader.version(clip_id)


def upstream_digests(readers: dict, clip_id: str) -> dict:
    return {alias: _upstream_digest(r, clip_id) for alias, r in readers.items()}


def clip_digests(columns, manifest_dir: str, rows: list[dict], readers: dict) -> dict[str, str]:
    """clip id -> digest of its inputs as they are now (``columns``: the stage's ``reads``)."""
    digests = {r["clip_id"]: clip_digest(r, columns, manifest_dir, upstream_digests(readers, r["clip_id"])) for r in rows}
    CONTENT_HASHES.flush()  # --input-digest content: remember the files hashed for the next run
    return digests


def select_work(rows: list[dict], index: dict[str, ClipVersion], digests: dict[str, str], force: bool = False) -> Selection:
    sel = Selection()
    for row in rows:
        have = index.get(row["clip_id"])
        if have is None:
            sel.todo.append(row)
        elif have.withdrawn or (have.digest is not None and have.digest != digests[row["clip_id"]]):
            sel.todo.append(row)
            sel.stale += 1
            sel.withdraw[row["clip_id"]] = have.key
        elif force:
            sel.todo.append(row)
        elif have.digest is None:
            sel.cached += 1
            sel.undigested += 1
        else:
            sel.cached += 1
    return sel


def current_fit_key(rows: list[dict], readers: dict) -> str:
    """The key of a whole-dataset fit over ``rows``: their ids and the versions of their upstream clips."""
    return fit_key({r["clip_id"]: upstream_digests(readers, r["clip_id"]) for r in rows})


def fit_decision(
    stored_key: str | None, stored_clips: int, key: str, clips: int, fingerprint: str, force: bool, reuse_fit: str | None
) -> tuple[bool, str | None]:
    """(reuse the stored fit?, a note for the summary) for a whole-dataset stage with a result."""
    if force:
        return False, "refitting: --force"
    if stored_key == key:
        return True, None
    if reuse_fit:
        if (stored_key or "").startswith(reuse_fit) or fingerprint.startswith(reuse_fit):
            return True, (
                f"reusing the fit pinned with --reuse-fit (fitted on {stored_clips if stored_clips >= 0 else 'unknown'} "
                f"clips; this manifest has {clips})"
            )
        raise ValueError(f"--reuse-fit {reuse_fit}: the stored fit has key {stored_key} (output {fingerprint})")
    why = (
        "it was fitted before soundstage recorded the clips of a fit"
        if stored_key is None
        else f"its clips, or the versions of their upstream clips, changed since the fit ({stored_clips} clips, key {stored_key}; now {clips} clips)"
    )
    return False, f"refitting: {why}; to keep the old fit instead, pass --reuse-fit {stored_key or fingerprint}"
