"""Child processes that end with the process they work for.

A decoding worker or a shard process whose parent was killed (``kill -9``, the OOM killer) would
otherwise live on, blocked writing to a pipe nobody reads, and keep the forkserver and the
resource tracker alive with it. Each such child watches its parent in a daemon thread and exits
as soon as the parent is gone. (The parent is named by pid and start time, so a recycled pid is
not mistaken for it; with the forkserver start method the child's own parent is the forkserver,
which is why the pid is handed over rather than read with ``os.getppid``.)
"""

from __future__ import annotations

import os
import threading
import time


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc``), or None where unknown; "" when the process
    is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return ""
    except OSError:
        return None
    return "" if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int, started: str | None = None) -> bool:
    now = start_time(pid)
    if now is None:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return bool(now) and (started is None or now == started)


def parent_token() -> tuple[int, str | None]:
    """What a child needs to watch this process: ``(pid, start time)``."""
    pid = os.getpid()
    return pid, start_time(pid)


def exit_with(parent: tuple[int, str | None], interval: float = 0.5) -> None:
    """Exit this process (status 1, no cleanup: its parent is gone) once ``parent`` is."""
    pid, started = parent

    def watch():
        while alive(pid, started):
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="soundstage-lifeline", daemon=True).start()
