"""Who may change a stage output, and when.

Three kinds of lock files under ``<output>/locks/`` (``flock``: the kernel releases them when
the holder dies, so a ``kill -9`` never leaves a stale lock):

``shard-<i>-of-<n>.lock``  exclusive: one writer per shard (``ShardLocked`` otherwise).
``output.lock``            writers hold it shared; compaction, repair and removal hold it
                           exclusively, so they are refused while any writer runs and a writer
                           is refused while one of them runs.
``admit.lock``             held for an instant while a writer enters: it checks that no live
                           writer uses another shard count. Shards ``i/N`` and ``j/M`` with
                           ``N != M`` overlap (a clip hashes into one shard of each), so two
                           such writers would compute the same clips twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
from contextlib import contextmanager

from soundstage.cache.store import CacheError, ShardLock, StageDir

OUTPUT_LOCK = "output.lock"
ADMIT_LOCK = "admit.lock"
_SHARD_LOCK = re.compile(r"^shard-(\d+)-of-(\d+)\.lock$")


class OutputBusy(CacheError):
    """A writer, compaction or removal holds the output; try again when it is done."""


class ShardCountConflict(CacheError):
    """A live writer of the same output uses another shard count."""


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _try_lock(path: str, mode: int) -> int | None:
    """An fd holding ``flock(mode)`` on ``path``, or None when someone else holds a conflicting lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def _admission(sd: StageDir):
    os.makedirs(sd.locks_dir, exist_ok=True)
    fd = os.open(os.path.join(sd.locks_dir, ADMIT_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for microseconds by whoever enters
        yield
    finally:
        _release(fd)


def live_writers(sd: StageDir, skip: str | None = None) -> list[tuple[str, str]]:
    """(lock file name, holder) of every shard lock held right now (probed without blocking)."""
    found = []
    if not os.path.isdir(sd.locks_dir):
        return found
    for name in sorted(os.listdir(sd.locks_dir)):
        if name == skip or not (_SHARD_LOCK.match(name) or name == "global.lock"):
            continue
        path = os.path.join(sd.locks_dir, name)
        fd = _try_lock(path, fcntl.LOCK_EX)
        if fd is None:
            found.append((name, _read(path)))
        else:
            _release(fd)
    return found


@contextmanager
def writer_lock(sd: StageDir, shard: tuple[int, int] | None):
    """Held by the writer of ``shard`` (None: the whole-dataset result) for its whole run."""
    name = "global" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"
    shard_lock = sd.lock(name)
    shared = None
    with _admission(sd):
        shared = _try_lock(os.path.join(sd.locks_dir, OUTPUT_LOCK), fcntl.LOCK_SH)
        if shared is None:
            raise OutputBusy(
                f"{sd.path} is being compacted, repaired or removed "
                f"({_read(os.path.join(sd.locks_dir, OUTPUT_LOCK))}); run again when that is done"
            )
        try:
            shard_lock.__enter__()  # ShardLocked: another writer of this very shard
            if shard is not None:
                others = [
                    (n, h)
                    for n, h in live_writers(sd, skip=f"{name}.lock")
                    if (m := _SHARD_LOCK.match(n)) and int(m.group(2)) != shard[1]
                ]
                if others:
                    lock_name, holder = others[0]
                    count = _SHARD_LOCK.match(lock_name).group(2)
                    raise ShardCountConflict(
                        f"a writer with {count} shards is running on {sd.path} ({lock_name}: {holder}); shards of "
                        f"different counts overlap, so --shard {shard[0]}/{shard[1]} would compute the same clips "
                        f"again: use --shard i/{count} while it runs, or wait for it to finish"
                    )
        except BaseException:
            shard_lock.__exit__()
            _release(shared)
            raise
    try:
        yield
    finally:
        shard_lock.__exit__()
        _release(shared)


@contextmanager
def exclusive_lock(sd: StageDir, action: str):
    """Held by whatever rewrites or removes committed parts (``action``: e.g. "compact")."""
    path = os.path.join(sd.locks_dir, OUTPUT_LOCK)
    with _admission(sd):
        fd = _try_lock(path, fcntl.LOCK_EX)
        if fd is None:
            writers = live_writers(sd)
            who = (
                f"a writer is running ({writers[0][0]}: {writers[0][1]})"
                if writers
                else f"another maintenance command holds it ({_read(path)})"
            )
            raise OutputBusy(f"cannot {action} {sd.path}: {who}; run again when it is done")
        os.ftruncate(fd, 0)
        os.write(fd, f"{action}: {_holder_text()}".encode())
    try:
        yield
    finally:
        _release(fd)


__all__ = ["OutputBusy", "ShardCountConflict", "ShardLock", "exclusive_lock", "live_writers", "writer_lock"]
