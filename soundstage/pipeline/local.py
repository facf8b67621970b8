"""Running a stage on this machine: one shard, or several shards in parallel processes."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time

import cloudpickle

from soundstage.cache.store import StageDir
from soundstage.pipeline.freshness import upstream_readers
from soundstage.pipeline.lifeline import exit_with, fork_server_context, parent_token, take_stop_signals_back
from soundstage.pipeline.runner import Summary, plan_stage, run_stage, settled, shard_rows
from soundstage.pipeline.shard import in_shard, parse_shard, shard_from_env, shard_of
from soundstage.pipeline.stage import Stage


def sub_shards(shard: tuple[int, int], jobs: int) -> list[tuple[int, int]]:
    """Split shard i/N into ``jobs`` shards of i/N: j*N + i of N*jobs (hash mod N*jobs == i mod N)."""
    i, n = shard
    return [(i + n * j, n * jobs) for j in range(jobs)]


def quiet_model_loading(progress: bool) -> None:
    """Model libraries' own bars (the Hugging Face hub's, transformers' "Loading weights") follow
    ``--no-progress`` and stay out of logs without a terminal (SLURM): through the hub's documented
    environment variable, read when those libraries are first imported and by every child process."""
    if not progress or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_local(
    stage: Stage,
    manifest: str,
    cache: str,
    params: dict,
    upstream_select: dict | None = None,
    shard: str | tuple | None = None,
    jobs: int = 1,
    **runner_kwargs,
) -> Summary:
    quiet_model_loading(runner_kwargs.get("progress", True))
    if isinstance(shard, str):
        shard = parse_shard(shard)
    shard = shard or shard_from_env() or (0, 1)
    if jobs <= 1 or stage.kind == "global":
        return run_stage(stage, manifest, cache, params, upstream_select, shard=shard, **runner_kwargs)

    start = time.monotonic()
    log = runner_kwargs.get("log", print)
    if runner_kwargs.get("fingerprint"):  # planned by the caller: checked here, not recomputed
        plan = plan_stage(stage, manifest, cache, params, upstream_select, log=log, fingerprint=runner_kwargs["fingerprint"])
    else:  # plan once here; the shard processes check, not recompute
        plan = plan_stage(stage, manifest, cache, params, upstream_select, log=log)
        runner_kwargs["fingerprint"] = plan.fingerprint
    plan.dir.initialise(plan.meta)
    runner_kwargs["progress"] = False  # N bars on one terminal are noise; the summary follows
    summary = Summary(stage.name, plan.fingerprint, plan.dir.path, shard)
    # the shard's rows are read once, here; each process gets its share of them
    rows, bad = shard_rows(stage, manifest, shard, runner_kwargs.pop("task_plan", None), summary)
    if not runner_kwargs.get("force") and not any(in_shard(cid, shard) for cid, _ in bad):
        # nothing to do (every clip committed with the inputs it has now): no process at all,
        # so an all-cached --jobs N costs what --jobs 1 does
        selection = settled(plan, rows, upstream_readers(plan))
        if selection is not None:
            summary.selected, summary.cached, summary.undigested = len(rows), selection.cached, selection.undigested
            summary.seconds = time.monotonic() - start
            return summary
    shards = sub_shards(shard, jobs)
    number = [shard_of(r["clip_id"], shards[0][1]) for r in rows]
    runs = [
        ShardProcess(
            stage,
            (manifest, cache, params, upstream_select),
            s,
            {**runner_kwargs, "share": ([r for r, k in zip(rows, number) if k == s[0]], bad)},
        )
        for s in shards
    ]
    with _ForwardStop(runs):
        outcomes = [run.outcome() for run in runs]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    merged = Summary.merge(outcomes)
    merged.notes = summary.notes + merged.notes  # why a task plan was not used, if it was not
    return merged


class ShardProcess:
    """One shard of a stage in its own process, which reports its ``Summary`` (or its exception)
    through a pipe and exits with this process if it is killed."""

    def __init__(self, stage: Stage, args: tuple, shard: tuple[int, int], runner_kwargs: dict):
        # the fork server imports the engine (and the stage) once; shards fork from it
        modules = ["soundstage.pipeline.runner", getattr(stage.load, "__module__", None)]
        context = fork_server_context([m for m in modules if m and m != "__main__"])
        self.shard, self.stage, self.cache_root = shard, stage, args[1]
        self.fingerprint = runner_kwargs["fingerprint"]
        self._conn, child_end = context.Pipe(duplex=False)
        job = cloudpickle.dumps((stage, *args, shard, runner_kwargs))
        self.process = context.Process(
            target=_shard_main, args=(job, child_end, parent_token()), name=f"soundstage {stage.name} shard {shard[0]}/{shard[1]}"
        )
        self.process.start()
        child_end.close()  # the child holds the only writing end: its death reads as EOF here

    def stop(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)

    def outcome(self):
        """The shard's Summary, its exception, or an interrupted Summary when it died without one."""
        try:
            result = self._conn.recv()
        except EOFError:
            result = None
        self.process.join()
        if result is not None:
            return result
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code and code < 0 else f"exit status {code}"
        path = StageDir.at(self.cache_root, self.stage.name, self.fingerprint).path
        return Summary(
            self.stage.name,
            self.fingerprint,
            path,
            self.shard,
            interrupted=True,
            notes=[f"shard {self.shard[0]}/{self.shard[1]} ended without a summary ({how})"],
        )


def _shard_main(job: bytes, conn, parent) -> None:
    take_stop_signals_back()
    exit_with(parent)
    stage, manifest, cache, params, upstream_select, shard, runner_kwargs = pickle.loads(job)
    try:
        result = run_stage(stage, manifest, cache, params, upstream_select, shard=shard, **runner_kwargs)
    except BaseException as e:  # reported to the parent, which raises it
        try:
            pickle.dumps(e)
            result = e
        except Exception:
            result = RuntimeError(f"{type(e).__name__}: {e}")
    conn.send(result)


class _ForwardStop:
    """While shard processes run: SIGTERM/SIGUSR1 (and a first Ctrl-C) are passed on to them as
    SIGTERM, so each commits what is finished and reports; a second Ctrl-C aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, runs: list[ShardProcess]):
        self.runs, self.stopping, self._old = runs, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.stopping:
            raise KeyboardInterrupt
        if not self.stopping:
            print(
                f"stopping: asking {len(self.runs)} shard process(es) to commit what is finished and report",
                file=sys.stderr,
                flush=True,
            )
        self.stopping = True
        for run in self.runs:
            run.stop()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if exc[0] is not None:  # an abort here: the shards must not run on unsupervised
            for run in self.runs:
                run.stop()
