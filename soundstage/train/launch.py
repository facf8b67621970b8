"""``soundstage train --nproc N``: N training processes on this machine, one DDP rank each.

The launcher starts the ranks with the environment ``torchrun`` would give them (static
rendezvous: ``MASTER_ADDR``/``MASTER_PORT`` of node 0, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), each in its own process group, and then only supervises:

* SIGTERM / SIGUSR1 / SIGINT to the launcher go on to every rank (SIGINT as SIGTERM): the ranks
  agree on the step to stop at, rank 0 writes the checkpoint, all exit with 75;
* a rank that dies otherwise (a crash, ``kill -9``) takes the others down at once (they would
  wait forever in the next all-reduce) and the launcher exits non-zero: rerun the command and it
  resumes from the last checkpoint;
* exit status: 0 when every rank finished, 75 when they stopped on a signal, else the first
  failure's (128 + signal for a killed rank).

Several machines: one launcher per machine with ``--nnodes M --node-rank R --master-addr HOST
--master-port PORT`` (the SLURM script does this with ``srun``); the rank of local process
``l`` is ``R·N + l``. We launch ourselves rather than through the ``torchrun`` CLI because
``torchrun`` ends on SIGUSR1 (the signal SLURM sends before a time limit) and reports 1 for any
rank's exit, where the requeue logic needs "stopped, checkpoint written" (75). Running under
``torchrun`` works too: a ``soundstage train`` that finds ``RANK``/``WORLD_SIZE`` is a rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from soundstage.pipeline import lifeline
from soundstage.train.command import run_training_command
from soundstage.train.config import TrainConfig

STOPPED = 75
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM}
WORKER = (sys.executable, "-m", "soundstage.train.launch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cfg: TrainConfig,
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    quiet: bool = False,
    log=print,
) -> int:
    """Run ``cfg`` on ``nproc`` local ranks (of ``nproc × nnodes``); returns the exit status."""
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port (node 0's address and a free port)")
    held = signal.pthread_sigmask(signal.SIG_BLOCK, list(FORWARDED))  # until the handlers below are in place
    pid, started = lifeline.parent_token()
    common = {
        "MASTER_ADDR": master_addr or "127.0.0.1",
        "MASTER_PORT": str(master_port or free_port()),
        "WORLD_SIZE": str(nproc * nnodes),
        "LOCAL_WORLD_SIZE": str(nproc),
        "SOUNDSTAGE_TRAIN_CONFIG": json.dumps(cfg.to_dict()),
        "SOUNDSTAGE_TRAIN_QUIET": "1" if quiet else "",
        "SOUNDSTAGE_LAUNCHER": f"{pid}:{started or ''}",
    }
    ranks = []
    for local in range(nproc):
        env = {**os.environ, **common, "RANK": str(node_rank * nproc + local), "LOCAL_RANK": str(local)}
        ranks.append(subprocess.Popen(WORKER, env=env, start_new_session=True))

    def forward(number, frame):
        for proc in ranks:
            if proc.poll() is None:
                os.kill(proc.pid, FORWARDED[number])

    previous = {number: signal.signal(number, forward) for number in FORWARDED}
    signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile goes on now
    try:
        return _supervise(ranks, node_rank * nproc, log)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _supervise(ranks: list, first_rank: int, log) -> int:
    while True:
        codes = [proc.poll() for proc in ranks]
        failed = [(i, c) for i, c in enumerate(codes) if c is not None and c not in (0, STOPPED)]
        if failed:
            i, code = failed[0]
            for proc in ranks:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            log(
                f"rank {first_rank + i} {how}; stopped the other ranks. Rerun the same command to resume from the last checkpoint"
            )
            return 128 - code if code < 0 else code
        if all(c is not None for c in codes):
            return STOPPED if STOPPED in codes else 0
        time.sleep(0.2)


def worker_main() -> int:
    """One rank started by ``launch``: the settings come from the environment."""
    # a stop signal before the training loop runs stays pending for it (the loop delivers it)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])

    pid, _, started = os.environ.get("SOUNDSTAGE_LAUNCHER", "").partition(":")
    if pid:
        lifeline.exit_with((int(pid), started or None))
    cfg = TrainConfig.from_dict(json.loads(os.environ["SOUNDSTAGE_TRAIN_CONFIG"]))
    return run_training_command(cfg, quiet=bool(os.environ.get("SOUNDSTAGE_TRAIN_QUIET")))


if __name__ == "__main__":
    sys.exit(worker_main())
