"""Child processes that end with the process they work for.

A decoding worker or a shard process whose parent was killed (``kill -9``, the OOM killer) would
otherwise live on, blocked writing to a pipe nobody reads, and keep the forkserver and the
resource tracker alive with it. Each such child watches its parent in a daemon thread and exits
as soon as the parent is gone. (The parent is named by pid and start time, so a recycled pid is
not mistaken for it; with the forkserver start method the child's own parent is the forkserver,
which is why the pid is handed over rather than read with ``os.getppid``.)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

#: what asks a toolkit process to commit what is finished and stop (terminal, SLURM, `kill`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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


def leave_stops_to_the_parent(*_) -> None:
    """In a helper process (a decoding worker, a DataLoader worker): ignore the stop signals. One
    sent to the whole process group (Ctrl-C, SLURM's time limit, ``timeout``, ``kill -- -PGID``)
    would otherwise kill the helper mid-item and break its parent's pool, which then fails where it
    should commit and stop; the parent stops its helpers when it has. (Also a ``worker_init_fn``.)"""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def fork_server_context(preload: list[str]):
    """The multiprocessing context for the toolkit's child processes: the fork server (its
    processes fork from one that imported ``preload`` once), which ignores stop signals
    (``soundstage.pipeline.fork_server``); spawn where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["soundstage.pipeline.fork_server", *preload])
    return context


def take_stop_signals_back() -> None:
    """In a process forked by the fork server that handles stops itself (a shard process): the
    default action again, until its own handlers are in place."""
    for number in STOP_SIGNALS:
        if number != signal.SIGINT:  # the fork server already gave SIGINT back
            signal.signal(number, signal.SIG_DFL)
