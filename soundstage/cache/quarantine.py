"""What ``soundstage verify`` found, and moving bad parts aside.

``verify`` records its verdict on every part in ``<output>/verified.json``: the part's size and
modification time and its problems (none: ok). A verdict holds only while the part has that
size and mtime. Readers and the runner use it:

- a part verify found bad is never read: reading one of its clips raises ``CorruptPart``, and
  a run of the stage stops and names it, until ``soundstage verify --repair`` moves it to
  ``<output>/quarantine/`` (with a ``.json`` note of its problems). Its clips are then simply
  not committed, so the next run computes exactly those clips again.
- while an output has a failed verdict, every part of it not verified ok since (new, or
  changed) is checksummed when a reader first opens it.

Why a marker and not a checksum of every part at first open: checksumming reads the whole
part, while a reader in training touches a few clips of each part (see benchmarks/README.md,
``bench_checksum.py``): the cost is paid once by ``verify`` instead of by every job.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from soundstage.cache.store import CacheError, StageDir, atomic_write_text

VERDICTS = "verified.json"
QUARANTINE = "quarantine"


class CorruptPart(CacheError):
    """A part that failed verification (or an integrity check at open): its data is not served."""


def repair_hint(path: str) -> str:
    return f"run `soundstage verify --repair {os.path.dirname(os.path.dirname(path))}` to move it to quarantine/; the next run recomputes its clips"


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load_verdicts(sd: StageDir) -> dict:
    """part file name -> {"size", "mtime_ns", "problems"} as the last verify recorded them."""
    path = os.path.join(sd.path, VERDICTS)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("parts", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable ({e}); delete it and run `soundstage verify` again") from None


def verdict(verdicts: dict, path: str) -> list[str] | None:
    """The problems verify found in the part at ``path`` ([] = ok), or None if not verified as it is now."""
    entry = verdicts.get(os.path.basename(path))
    if entry is None or _stamp(path) != (entry["size"], entry["mtime_ns"]):
        return None
    return list(entry["problems"])


def record_verdicts(sd: StageDir, results: dict[str, list[str]]) -> None:
    """Store verify's findings (part path -> problems) for the parts that exist now."""
    parts = {}
    for path, problems in results.items():
        stamp = _stamp(path)
        if stamp is not None:
            parts[os.path.basename(path)] = {"size": stamp[0], "mtime_ns": stamp[1], "problems": list(problems)}
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": parts}
    atomic_write_text(os.path.join(sd.path, VERDICTS), json.dumps(record, indent=1, sort_keys=True) + "\n")


def failed_parts(sd: StageDir) -> dict[str, list[str]]:
    """Part path -> problems, for the parts verify found bad and that are still in place, unchanged."""
    verdicts = load_verdicts(sd)
    candidates = [*sd.part_paths(), sd.result_path]
    return {p: v for p in candidates if (v := verdict(verdicts, p))}


def quarantine(sd: StageDir, path: str, problems: list[str]) -> str:
    """Move a bad part (or result.h5) out of the output, with a note of why; returns its new path."""
    folder = os.path.join(sd.path, QUARANTINE)
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = os.path.join(folder, f"{stamp}-{os.path.basename(path)}")
    shutil.move(path, target)
    note = {"from": path, "time": stamp, "problems": problems}
    atomic_write_text(target + ".json", json.dumps(note, indent=1) + "\n")
    return target


def repair(sd: StageDir) -> list[str]:
    """Quarantine every part the last verify found bad; returns their new paths."""
    moved = [quarantine(sd, path, problems) for path, problems in failed_parts(sd).items()]
    if moved:
        verdicts = load_verdicts(sd)
        paths = {n: sd.result_path if n == os.path.basename(sd.result_path) else os.path.join(sd.parts_dir, n) for n in verdicts}
        record_verdicts(sd, {paths[n]: v["problems"] for n, v in verdicts.items() if os.path.exists(paths[n])})
    return moved
