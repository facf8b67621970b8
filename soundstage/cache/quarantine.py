"""Verdicts on parts (sound or not), and moving bad parts aside.

A part is checked the first time anything reads it (``soundstage.cache.integrity``), and by
``soundstage verify``. The verdict is remembered per part name + size + mtime in
``<output>/verified.log``, one line per verdict: name, size, mtime_ns, the problems (JSON; [] =
sound) and a CRC of the line. A verdict holds only while the part has that size and mtime, so the
check costs once per part across processes and runs, and a part changed since is checked again.
Readers append (one short ``O_APPEND`` write, no file created per part); ``verify`` rewrites the
file atomically, keeping the verdicts on the parts that are there. A torn or garbled line (a crash,
or appends interleaved on a network file system) fails its CRC and is ignored: that part is then
simply checked again. A bad verdict wins over a sound one for the same size and mtime.

- a part found bad is never read: reading one of its clips raises ``CorruptPart``, and a run of
  the stage stops and names it, until ``soundstage verify --repair`` moves it to
  ``<output>/quarantine/`` (with a ``.json`` note of its problems). Its clips are then simply
  not committed, so the next run computes exactly those clips again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib

from soundstage.cache.store import CacheError, StageDir, atomic_write_text

VERDICTS = "verified.log"
LEGACY_VERDICTS = "verified.json"  # one JSON file per output, before the log; removed by the next verify
QUARANTINE = "quarantine"


class CorruptPart(CacheError):
    """A part that failed verification (or its check at first read): its data is not served.
    ``part``: its path; ``clips``: the clip ids it holds (when known)."""

    def __init__(self, message: str, part: str | None = None, clips=()):
        super().__init__(message)
        self.part, self.clips = part, list(clips)

    def __reduce__(self):  # raised in decoding worker processes: keep part and clips across the pipe
        return type(self), (str(self), self.part, self.clips)


def repair_hint(path: str) -> str:
    """What to do about the bad part (or whole-dataset result) at ``path``."""
    output = os.path.dirname(path)
    if os.path.basename(output) == "parts":
        output = os.path.dirname(output)
    return f"run `soundstage verify --repair {output}` to move it to quarantine/; the next run recomputes its clips"


def stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _line(name: str, at: tuple[int, int], problems: list[str]) -> str:
    body = f"{name}\t{at[0]}\t{at[1]}\t{json.dumps(list(problems))}"
    return f"{body}\t{zlib.crc32(body.encode()):08x}\n"


def load_verdicts(sd: StageDir) -> dict:
    """(part name, size, mtime_ns) -> the problems recorded ([] = sound)."""
    return read_verdicts(sd, 0, {})[0]


def read_verdicts(sd: StageDir, offset: int, out: dict) -> tuple[dict, int]:
    """Add the verdicts recorded from byte ``offset`` of the log on to ``out``; returns it and the
    offset after the last whole line (where to read on from when the log grows)."""
    try:
        with open(os.path.join(sd.path, VERDICTS), "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return out, 0
    whole = data.rfind(b"\n") + 1  # a line being appended is read next time
    for line in data[:whole].decode("utf-8", "replace").splitlines():
        body, _, crc = line.rpartition("\t")
        if not body or crc != f"{zlib.crc32(body.encode()):08x}":
            continue  # torn or garbled: that part is checked again
        name, size, mtime, problems = body.split("\t", 3)
        key = (name, int(size), int(mtime))
        problems = json.loads(problems)
        if problems or key not in out:  # bad wins
            out[key] = problems
    return out, offset + whole


def verdict(verdicts: dict, path: str) -> list[str] | None:
    """The problems recorded for the part at ``path`` as it is now ([] = sound), None if unchecked."""
    at = stamp(path)
    return None if at is None else verdicts.get((os.path.basename(path), *at))


def append_verdict(sd: StageDir, name: str, at: tuple[int, int], problems: list[str]) -> bool:
    """Remember one verdict (``at``: the part's size and mtime when it was checked); False when it
    cannot be written (a read-only cache: then the part is checked again by the next process)."""
    try:
        fd = os.open(os.path.join(sd.path, VERDICTS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, _line(name, at, problems).encode())  # one write: appends do not interleave locally
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def record_verdicts(sd: StageDir, results: dict[str, list[str]]) -> None:
    """Store verify's findings (part path -> problems), keeping the verdicts on the other parts
    still there and forgetting those on parts that are gone; one atomic rewrite."""
    present = {os.path.basename(p): stamp(p) for p in [*sd.part_paths(), sd.result_path] if os.path.exists(p)}
    kept = {key: problems for key, problems in load_verdicts(sd).items() if present.get(key[0]) == key[1:]}
    for path, problems in results.items():
        at = stamp(path)
        if at is not None:
            kept[(os.path.basename(path), *at)] = list(problems)  # verify's verdict replaces earlier ones
    atomic_write_text(os.path.join(sd.path, VERDICTS), "".join(_line(k[0], k[1:], v) for k, v in sorted(kept.items())))
    legacy = os.path.join(sd.path, LEGACY_VERDICTS)
    if os.path.exists(legacy):
        os.remove(legacy)


def failed_parts(sd: StageDir) -> dict[str, list[str]]:
    """Part path -> problems, for the parts verify found bad and that are still in place, unchanged."""
    verdicts = load_verdicts(sd)
    candidates = [*sd.part_paths(), sd.result_path]
    return {p: v for p in candidates if (v := verdict(verdicts, p))}


def quarantine(sd: StageDir, path: str, problems: list[str]) -> str:
    """Move a bad part (or result.h5) out of the output, with a note of why; returns its new path."""
    folder = os.path.join(sd.path, QUARANTINE)
    os.makedirs(folder, exist_ok=True)
    when = time.strftime("%Y%m%dT%H%M%S")
    target = os.path.join(folder, f"{when}-{os.path.basename(path)}")
    shutil.move(path, target)
    note = {"from": path, "time": when, "problems": problems}
    atomic_write_text(target + ".json", json.dumps(note, indent=1) + "\n")
    return target


def repair(sd: StageDir) -> list[str]:
    """Quarantine every part the last verify found bad; returns their new paths."""
    moved = [quarantine(sd, path, problems) for path, problems in failed_parts(sd).items()]
    if moved:
        record_verdicts(sd, {})  # forgets the verdicts on the parts moved away
    return moved
