"""Removing stage outputs: one chosen output (``cache rm``), or the useless ones (``cache gc``).

An output is removed only while no writer holds it (its exclusive lock). ``rm`` lists the
outputs that read it (their stage.json names it upstream) and removes them too only when asked;
``gc`` removes outputs with nothing committed (a failed first attempt, a planned run that never
ran; not those submitted to SLURM, whose tasks may still be queued: ``rm`` them) and outputs whose
upstream output is gone (orphans).
"""

from __future__ import annotations

import os
import shutil

from soundstage.cache.index import has_results
from soundstage.cache.locks import exclusive_lock
from soundstage.cache.store import CacheError, StageDir, iter_stage_dirs


def find_outputs(cache_root: str, selector: str) -> list[StageDir]:
    """Outputs a selector names: a directory, ``stage/FINGERPRINT-prefix``, or a fingerprint prefix."""
    if os.path.isdir(selector) and StageDir(selector).exists():
        return [StageDir(selector)]
    stage, _, prefix = selector.rpartition("/")
    return [sd for sd in iter_stage_dirs(cache_root, stage or None) if os.path.basename(sd.path).startswith(prefix)]


def dependents(cache_root: str, target: StageDir) -> list[StageDir]:
    """Every output that reads ``target``, directly or through others (nearest first)."""
    key = (os.path.basename(os.path.dirname(target.path)), os.path.basename(target.path))
    found, frontier = [], {key}
    all_outputs = list(iter_stage_dirs(cache_root))
    while frontier:
        reading = [sd for sd in all_outputs if sd not in found and _upstream_keys(sd) & frontier]
        found += reading
        frontier = {(os.path.basename(os.path.dirname(sd.path)), os.path.basename(sd.path)) for sd in reading}
    return found


def _upstream_keys(sd: StageDir) -> set:
    try:
        return {(u["stage"], u["fingerprint"]) for u in sd.meta().get("upstream", {}).values()}
    except (OSError, ValueError, KeyError):
        return set()


TRASH = ".removing-"


def remove_output(sd: StageDir) -> None:
    """Delete an output directory, holding it exclusively (refused while a writer runs). It is
    renamed out of sight first; what an interrupted removal leaves is ``leftovers`` for gc."""
    with exclusive_lock(sd, "remove"):
        trash = os.path.join(os.path.dirname(sd.path), f"{TRASH}{os.path.basename(sd.path)}-{os.getpid()}")
        os.rename(sd.path, trash)  # one step: the output is either whole or gone for readers
    shutil.rmtree(trash)


def leftovers(cache_root: str) -> list[str]:
    """Folders of removals that were interrupted (Ctrl-C, kill -9 during ``cache rm`` or ``gc``):
    out of sight already, their bytes still on disk."""
    if not os.path.isdir(cache_root):
        return []
    return [
        os.path.join(cache_root, stage, name)
        for stage in sorted(os.listdir(cache_root))
        if os.path.isdir(os.path.join(cache_root, stage))
        for name in sorted(os.listdir(os.path.join(cache_root, stage)))
        if name.startswith(TRASH)
    ]


def remove_leftover(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)  # another gc may be removing it too


def garbage(cache_root: str) -> list[tuple[StageDir, str]]:
    """(output, why) for outputs with nothing committed, and outputs whose upstream is gone."""
    out = []
    for sd in iter_stage_dirs(cache_root):
        if not has_results(sd):
            if not os.path.isdir(os.path.join(sd.path, "logs")):  # logs/: submitted to SLURM, tasks may be queued
                out.append((sd, "nothing committed"))
            continue
        missing = [f"{s}/{fp}" for s, fp in _upstream_keys(sd) if not StageDir.at(cache_root, s, fp).exists()]
        if missing:
            out.append((sd, f"upstream {', '.join(missing)} is gone"))
    return out


__all__ = ["CacheError", "dependents", "find_outputs", "garbage", "leftovers", "remove_leftover", "remove_output"]
