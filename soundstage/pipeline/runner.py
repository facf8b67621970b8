"""The runner: everything a stage does not declare, written once.

For one shard of a manifest it skips clips already committed, decodes inputs in prefetching
worker processes, batches equal-keyed items, calls the stage, commits parts atomically, records
failed clips, shows progress and ends with a summary. SIGTERM/SIGUSR1 (SLURM preemption or
time limit) commit what is finished and stop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from soundstage.cache.index import committed_index, output_status
from soundstage.cache.locks import writer_lock
from soundstage.cache.maintenance import PINNED, merge_shard_parts
from soundstage.cache.quarantine import CorruptPart
from soundstage.cache.reader import MissingClip
from soundstage.cache.store import CacheError, PartWriter, StageDir, atomic_write_text
from soundstage.pipeline.attempts import Attempts
from soundstage.pipeline.fingerprint import normalise_params, plan_mismatch, stage_meta
from soundstage.pipeline.freshness import (
    clip_digests,
    current_fit_key,
    fit_decision,
    select_work,
    stored_fit,
    upstream_readers,
)
from soundstage.pipeline.lifeline import exit_with, fork_server_context, leave_stops_to_the_parent, parent_token
from soundstage.pipeline.progress import progress_bar
from soundstage.pipeline.resolve import resolve_upstreams
from soundstage.pipeline.shard import in_shard, manifest_share, select_shard, shard_from_env
from soundstage.pipeline.stage import ClipError, FitContext, LoadContext, Stage
from soundstage.pipeline.task_plan import read_task_plan


@dataclass
class Summary:
    stage: str
    fingerprint: str
    path: str
    shard: tuple = (0, 1)
    selected: int = 0  # clips of this shard in the manifest
    done: int = 0  # computed and committed by this run
    cached: int = 0  # already committed before this run, with the same inputs
    stale: int = 0  # committed before, recomputed because their inputs changed
    undigested: int = 0  # of cached: committed before input digests were recorded (trusted)
    notes: list = field(default_factory=list)  # e.g. why a whole-dataset fit was redone or reused
    failed: list = field(default_factory=list)  # (clip_id, cause) of this run
    warnings: list = field(default_factory=list)  # (clip_id, note) of done clips worth a look
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def format(self, max_failures: int = 10) -> str:
        i, n = self.shard
        shard = f" shard {i}/{n}" if n > 1 else ""
        lines = [
            f"{self.stage} {self.fingerprint}{shard}: done {self.done}, already cached {self.cached}, stale {self.stale}, "
            f"failed {len(self.failed)}, {self.seconds:.1f} s" + (" — INTERRUPTED, rerun to finish" if self.interrupted else "")
        ]
        lines += [f"  {note}" for note in self.notes]
        if self.undigested:
            lines.append(
                f"  {self.undigested} cached clip(s) have no input digest (computed before soundstage recorded "
                "inputs): trusted as they are; --force recomputes them"
            )
        if self.warnings:
            lines.append(f"  {len(self.warnings)} done clip(s) with warnings, e.g.:")
            lines += [f"    {cid}: {note}" for cid, note in self.warnings[:3]]
        for cid, cause in self.failed[:max_failures]:
            lines.append(f"  failed {cid}: {cause}")
        if len(self.failed) > max_failures:
            lines.append(f"  ... and {len(self.failed) - max_failures} more")
        if self.failed:
            lines.append(f"  failure records: {os.path.join(self.path, 'failures')}")
        lines.append(f"  output: {self.path}")
        return "\n".join(lines)

    @classmethod
    def merge(cls, summaries: list[Summary]) -> Summary:
        first = summaries[0]
        return cls(
            stage=first.stage,
            fingerprint=first.fingerprint,
            path=first.path,
            shard=(0, 1),
            selected=sum(s.selected for s in summaries),
            done=sum(s.done for s in summaries),
            cached=sum(s.cached for s in summaries),
            stale=sum(s.stale for s in summaries),
            undigested=sum(s.undigested for s in summaries),
            notes=[n for s in summaries for n in s.notes],
            failed=[f for s in summaries for f in s.failed],
            warnings=[w for s in summaries for w in s.warnings],
            seconds=max(s.seconds for s in summaries),
            interrupted=any(s.interrupted for s in summaries),
        )


# ------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What a run of a stage means before anything is computed: its output dir and inputs."""

    stage: Stage
    params: dict
    upstream: dict  # alias -> StageDir
    fingerprint: str
    dir: StageDir
    meta: dict
    manifest_path: str
    clip_digests: dict = field(default_factory=dict)  # clip id -> digest of its inputs, stored on commit
    withdraw: dict = field(default_factory=dict)  # stale clip id -> key of its committed version, not current

    @property
    def manifest_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.manifest_path))


class PlanError(RuntimeError):
    """An array task does not match the output planned for it."""


def plan_stage(
    stage: Stage,
    manifest_path: str,
    cache_root: str,
    params: dict,
    upstream_select=None,
    log=print,
    fingerprint: str | None = None,
) -> Plan:
    """Where ``stage`` under ``params`` goes. With ``fingerprint`` (an array task of a planned
    run) the output planned at submission is used as its stage.json says, checked against
    ``params`` instead of recomputed: no model is hashed again, no hub revision re-resolved."""
    params = normalise_params(stage, params)
    if fingerprint and StageDir.at(cache_root, stage.name, fingerprint).exists():
        sd = StageDir.at(cache_root, stage.name, fingerprint)
        meta = sd.meta()
        mismatch = plan_mismatch(stage, params, meta)
        if mismatch:
            raise PlanError(f"{sd.meta_path}: {mismatch}")
        upstream = {alias: StageDir.at(cache_root, u["stage"], u["fingerprint"]) for alias, u in meta["upstream"].items()}
        return Plan(stage, params, upstream, fingerprint, sd, meta, manifest_path)
    # not planned yet (a dry run's script run by hand): plan here, and only into the fingerprint handed
    upstream = resolve_upstreams(stage, cache_root, upstream_select, log=log)
    meta = stage_meta(stage, params, {alias: (sd.meta()["stage"], sd.meta()["fingerprint"]) for alias, sd in upstream.items()})
    if fingerprint and meta["fingerprint"] != fingerprint:
        raise PlanError(
            f"the run was planned as {stage.name} {fingerprint}, but here its inputs give {meta['fingerprint']} "
            "(a model file or hub revision differs on this machine?); nothing was written"
        )
    return Plan(
        stage,
        params,
        upstream,
        meta["fingerprint"],
        StageDir.at(cache_root, stage.name, meta["fingerprint"]),
        meta,
        manifest_path,
    )


def manifest_rows(manifest_path: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Usable rows (unique, non-empty clip ids) with every column, and (clip_id, cause) for rows
    that are not: the whole manifest as one shard (``manifest_share``)."""
    return manifest_share(manifest_path)


def pending_clips(stage: Stage, params: dict, manifest_path: str, cache_root: str, upstream_select=None, shard=(0, 1)) -> int:
    """How many clips of ``shard`` are not committed yet (for relaunching only unfinished shards)."""
    plan = plan_stage(stage, manifest_path, cache_root, params, upstream_select, log=lambda *_: None)
    rows, _ = manifest_rows(manifest_path)
    status = output_status(plan.dir, [r["clip_id"] for r in select_shard(rows, *shard)], whole_dataset=stage.kind == "global")
    return (0 if status.fitted else 1) if status.whole_dataset else len(status.todo)


# ------------------------------------------------------------------------------- prefetch

_WORKER = {}


def _worker_init(load, ctx, parent=None):
    _WORKER["load"], _WORKER["ctx"] = load, ctx
    leave_stops_to_the_parent()
    if parent:  # and when it is gone (kill -9), so is this worker
        exit_with(parent)


def _load_guarded(load, ctx, row):
    """Run ``load`` for one row; an exception becomes a failure record, never a crash.
    Returns (ok, item or cause, detail, whether the error is not about this clip's input)."""
    try:
        return True, load(row, ctx), "", False
    except ClipError as e:
        return False, str(e), "", False
    except CorruptPart:  # damaged upstream data is not this clip's failure: the run stops and names the part
        raise
    except Exception as e:  # an unexpected error is still this clip's failure
        return False, f"{type(e).__name__}: {e}", traceback.format_exc(limit=5), not _is_input_error(e)


def _is_input_error(error: Exception) -> bool:
    """A problem with one clip's input: raised as such, or the clip missing from an upstream output."""
    return isinstance(error, (ClipError, MissingClip))


class SystemicFailure(RuntimeError):
    """Many clips in a row failed with errors that are not about their input: the model or the
    environment is broken (CUDA error, out of memory, a library bug), so the run stops."""


def _worker_load(row):
    return _load_guarded(_WORKER["load"], _WORKER["ctx"], row)


def prefetch(load, ctx, rows, workers: int, depth: int):
    """Yield (row, ok, item_or_cause, detail, systemic) in order, keeping ``depth`` loads in flight."""
    if workers <= 0:
        for row in rows:
            yield (row, *_load_guarded(load, ctx, row))
        return
    context = fork_server_context(["__main__", getattr(load, "__module__", "__main__")])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(load, ctx, parent_token()))
    try:
        pending = deque()
        it = iter(rows)
        for row in it:
            pending.append((row, pool.submit(_worker_load, row)))
            if len(pending) >= depth:
                break
        while pending:
            row, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_worker_load, nxt)))
            yield (row, *fut.result())
    finally:
        end_workers(pool)


def end_workers(pool: ProcessPoolExecutor) -> None:
    """End a decoding pool now, busy or not: what it still decodes is no longer wanted (the loop
    ended or stopped). Its workers are terminated and the pool joined, so none is left waiting for
    work: a process that exits right after ``shutdown(wait=False)`` closes the queue the pool's own
    thread would have sent the workers their stop on, and then waits for them forever."""
    workers = list((pool._processes or {}).values())  # no public way to reach them before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()  # not terminate(): they ignore SIGTERM (leave_stops_to_the_parent)
    pool.shutdown(wait=True)


# ------------------------------------------------------------------------------- running


class _StopRequested:
    """SIGTERM/SIGUSR1 (SLURM) and a first Ctrl-C set a flag; the loop commits what is finished
    and returns its summary. A second Ctrl-C aborts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        if _in_main_thread():  # the only thread that may set handlers (a shard process's too)
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.flag:
                raise KeyboardInterrupt
            print(
                "\nstopping after the current batch, committing what is finished (Ctrl-C again: abort now)",
                file=sys.stderr,
                flush=True,
            )
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclass
class RunOptions:
    """How a run goes; none of it changes what is stored (it is not in the fingerprint)."""

    shard: tuple | None = None  # (index, count); default: the SLURM array task's, else all
    workers: int = 0  # decoding worker processes (0: decode inline)
    batch_size: int | None = None  # clips per process() call; default: the stage's
    commit_every: int = 256  # clips per committed part
    commit_seconds: float = 120.0  # ... or this long since the last commit
    progress: bool = True
    log: Callable = print
    fingerprint: str | None = None  # the output planned at submission (array tasks check it)
    force: bool = False  # recompute every selected clip (or refit)
    reuse_fit: str | None = None  # whole-dataset stages: keep the stored fit with this key or fingerprint (prefix)
    max_consecutive_errors: int = 20  # this many clips failing in a row, not for their input: SystemicFailure (0: never)
    share: tuple | None = None  # (rows, unusable rows) of this shard, read already (--jobs reads the manifest once)
    task_plan: str | None = None  # the planner's per-task rows (SLURM array tasks; see pipeline.task_plan)


def run_stage(
    stage: Stage,
    manifest_path: str,
    cache_root: str,
    params: dict | None = None,
    upstream_select: dict | None = None,
    options: RunOptions | None = None,
    **option_values,
) -> Summary:
    """Run ``stage`` on one shard of a manifest; returns the summary (never raises for a clip).

    ``options`` (or its fields as keywords: ``shard=(0, 4), workers=2``) say how (``RunOptions``).
    Clips whose inputs changed since they were committed are recomputed (``stale``); clips failing
    in a row with errors not about their input raise ``SystemicFailure``."""
    opts = dataclasses.replace(options or RunOptions(), **option_values)
    start = time.monotonic()
    shard = opts.shard or shard_from_env() or (0, 1)
    plan = plan_stage(stage, manifest_path, cache_root, params or {}, upstream_select, log=opts.log, fingerprint=opts.fingerprint)
    summary = Summary(stage.name, plan.fingerprint, plan.dir.path, shard)
    if stage.kind == "global":
        plan.dir.initialise(plan.meta)
        return _run_global(plan, summary, start, opts.log, opts.force, opts.reuse_fit, opts.progress)

    # the planner's rows for this task, else by column and only this shard's rows: start-up costs the shard's share
    mine, bad_rows = opts.share if opts.share is not None else shard_rows(stage, manifest_path, shard, opts.task_plan, summary)
    summary.selected = len(mine)
    # a first attempt validates its parameters and loads the model before the output exists,
    # so a typo leaves no empty output behind
    model = stage.setup(plan.params) if stage.setup and mine and not plan.dir.exists() else None
    plan.dir.initialise(plan.meta)
    writer_prefix = f"s{shard[0]:05d}of{shard[1]:05d}"
    writer_id = f"{writer_prefix}-{uuid.uuid4().hex[:8]}"
    with writer_lock(plan.dir, shard), _StopRequested() as stop:
        plan.dir.remove_stale_temp_files(writer_prefix)
        readers = upstream_readers(plan)
        plan.clip_digests = clip_digests(stage.reads, plan.manifest_dir, mine, readers)
        committed = committed_index(plan.dir, plan.clip_digests)
        plan.dir.merge_failure_records(writer_prefix, f"{writer_id}.jsonl", committed)  # records do not grow with reruns
        selection = select_work(mine, committed, plan.clip_digests, opts.force)
        plan.withdraw = selection.withdraw
        # a stale clip's old version stops being current now, before it is recomputed: a reader never
        # gets it, whether the recomputation fails or this run is killed first
        plan.dir.record_failures(
            writer_id,
            [(cid, STALE_CAUSE, "", key) for cid, key in selection.withdraw.items() if not committed[cid].withdrawn],
        )
        todo = selection.todo
        summary.cached, summary.stale, summary.undigested = selection.cached, selection.stale, selection.undigested
        todo = _skip_clips_that_killed_a_run(plan, writer_prefix, writer_id, todo, summary, opts.force)
        for cid, cause in bad_rows:  # unusable manifest rows: each reported by the shard of its id
            if not in_shard(cid, shard):
                continue
            plan.dir.record_failure(writer_id, cid, cause, withdraws=_committed_key(committed, cid))
            summary.failed.append((cid, cause))
        if todo:
            _process_clips(plan, todo, summary, writer_id, stop, opts, readers, model)
        if not (summary.interrupted or stop.flag):  # many small parts of this shard become a few
            try:
                merge_shard_parts(plan.dir, writer_prefix, f"{writer_prefix}-{uuid.uuid4().hex[:8]}")
            except CacheError as e:
                summary.notes.append(f"small parts left unmerged: {e}")
        # a stop that came during the last batch still stops what follows (`soundstage run`'s chain)
        summary.interrupted = summary.interrupted or stop.flag
    summary.seconds = time.monotonic() - start
    return summary


#: the failure record of a stale clip until it is recomputed
STALE_CAUSE = "stale: its inputs changed since it was computed, and it has not been recomputed yet"


def _committed_key(committed: dict, clip_id: str) -> str | None:
    """The key of the committed version of a clip whose manifest row is now unusable (not current)."""
    have = committed.get(clip_id)
    return have.key if have is not None and have.key else None


def settled(plan: Plan, rows: list[dict], readers: dict):
    """The ``Selection`` of ``rows`` when every one is committed with the inputs it has now
    (nothing to do), else None. Cheap when a clip is missing: inputs are digested only when
    every clip is committed. (``--jobs`` asks this before it starts a process per shard.)"""
    committed = committed_index(plan.dir, [r["clip_id"] for r in rows])
    if len(committed) < len(rows):
        return None
    selection = select_work(rows, committed, clip_digests(plan.stage.reads, plan.manifest_dir, rows, readers))
    return None if selection.todo else selection


def shard_rows(stage: Stage, manifest_path: str, shard: tuple, task_plan: str | None, summary: Summary) -> tuple[list, list]:
    """(rows, unusable rows) of ``shard``: from the task's plan file when it holds for this
    manifest, else read from the manifest (the summary says why the plan was not used)."""
    if task_plan:
        share, why = read_task_plan(task_plan, manifest_path, shard)
        if share is not None:
            return share
        summary.notes.append(f"{why}: read the manifest instead")
    return manifest_share(manifest_path, stage, shard)


def _skip_clips_that_killed_a_run(plan, writer_prefix, writer_id, todo, summary, force):
    """Clips an earlier run died in (``Stage.risky`` ones) are failures, not tried again unless ``force``."""
    attempts = Attempts(plan.dir.path, writer_prefix)
    died = attempts.collect()
    if force:
        attempts.forget(died)
        return todo
    for row in todo:
        if row["clip_id"] in died:
            plan.dir.record_failure(writer_id, row["clip_id"], died[row["clip_id"]], withdraws=plan.withdraw.get(row["clip_id"]))
            summary.failed.append((row["clip_id"], died[row["clip_id"]]))
    return [row for row in todo if row["clip_id"] not in died]


def _process_clips(plan, todo, summary, writer_id, stop, opts: RunOptions, readers, model=None):
    stage, params = plan.stage, plan.params
    workers, batch_size = opts.workers, opts.batch_size or stage.default_batch_size
    max_consecutive_errors = opts.max_consecutive_errors
    ctx = LoadContext(params=params, upstream=readers, manifest_dir=plan.manifest_dir)
    if model is None and stage.setup:
        model = stage.setup(params)
    if stage.metadata:
        plan.dir.set_metadata(stage.metadata(model, params))
    buffer = PartWriter(plan.dir, writer_id, stage.fields, plan.meta, opts.commit_every, opts.commit_seconds)
    buckets: dict = {}
    bar = progress_bar(len(todo), f"{stage.name} {summary.shard[0]}/{summary.shard[1]}", opts.progress)

    streak = []  # causes of the clips failing in a row with errors not about their input

    def fail(cid, cause, detail="", systemic=False):
        plan.dir.record_failure(writer_id, cid, cause, detail, withdraws=plan.withdraw.get(cid))
        summary.failed.append((cid, cause))
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed), refresh=False)
        if not systemic:
            return
        streak.append(cause)
        if max_consecutive_errors and len(streak) >= max_consecutive_errors:
            raise SystemicFailure(
                f"{stage.name}: stopped after {len(streak)} clips in a row failed with errors that are not about "
                f"their input (last: {cause}); the model or the environment looks broken. Finished clips are "
                f"committed; fix the cause and rerun (failure records: {plan.dir.failures_dir})"
            )

    def run_batch(batch):
        try:
            results = stage.process(model, [item for _, item in batch], params)
            if len(results) != len(batch):
                raise ValueError(f"stage returned {len(results)} results for {len(batch)} clips")
            values = [buffer.validate(r) for r in results]
        except CorruptPart:
            raise
        except Exception as e:
            if len(batch) > 1:  # find the clip that breaks the batch; the others go on
                for one in batch:
                    run_batch([one])
                return
            cause = str(e) if isinstance(e, ClipError) else f"{type(e).__name__}: {e}"
            fail(batch[0][0], cause, traceback.format_exc(limit=5), systemic=not _is_input_error(e))
            return
        for (cid, _), v in zip(batch, values):
            try:
                buffer.check_run_time_sizes(v)
            except ValueError as e:
                fail(cid, str(e))
                continue
            buffer.add(cid, v, plan.clip_digests.get(cid))
            streak.clear()
            note = stage.warn(v) if stage.warn else None
            if note:
                summary.warnings.append((cid, note))
            bar.update(1)

    try:
        for row, ok, item, detail, systemic in prefetch(stage.load, ctx, todo, workers, depth=max(2 * batch_size, 4 * workers)):
            cid = row["clip_id"]
            if not ok:
                fail(cid, item, detail, systemic)
            elif stage.risky and stage.risky(item):  # alone, after everything before it is done and committed
                for key in list(buckets):
                    run_batch(buckets.pop(key))
                buffer.commit()
                with Attempts(plan.dir.path, writer_id.rsplit("-", 1)[0]).running(cid):
                    run_batch([(cid, item)])
            else:
                key = stage.batch_key(item) if stage.batch_key else None
                bucket = buckets.setdefault(key, [])
                bucket.append((cid, item))
                if len(bucket) >= batch_size:
                    run_batch(buckets.pop(key))
                elif sum(len(b) for b in buckets.values()) >= 4 * batch_size:  # many keys: bound memory
                    run_batch(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
            if stop.flag:
                summary.interrupted = True
                break
        if not summary.interrupted:
            for key in list(buckets):
                run_batch(buckets.pop(key))
    finally:
        buffer.commit()  # what is finished is kept, also on an exception or a stop signal
        bar.close()
    summary.done = buffer.committed


def _run_global(
    plan: Plan, summary: Summary, start: float, log, force: bool = False, reuse_fit: str | None = None, progress: bool = False
) -> Summary:
    """Fit once; a stored fit is reused only for the same clips (their ids and upstream digests)."""
    sd = plan.dir
    with writer_lock(sd, None):
        rows, _ = manifest_rows(plan.manifest_path)
        readers = upstream_readers(plan)
        key = current_fit_key(rows, readers)
        summary.selected = 1
        reuse, note = False, None
        if os.path.exists(sd.result_path):
            stored_key, stored_clips = stored_fit(sd.result_path)
            reuse, note = fit_decision(stored_key, stored_clips, key, len(rows), plan.fingerprint, force, reuse_fit)
        if note:
            summary.notes.append(note)
        pinned = os.path.join(sd.path, PINNED)
        if reuse:
            summary.cached = 1
            if note:  # pinned for other clips: status says so
                atomic_write_text(
                    pinned, json.dumps({"clips": len(rows), "fit_key_now": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                )
        else:
            ctx = FitContext(
                params=plan.params, upstream=readers, clip_ids=[r["clip_id"] for r in rows], rows=rows, log=log, progress=progress
            )
            arrays = plan.stage.fit(ctx)
            sd.write_result(arrays, {"fit_key": key, "fit_clips": len(rows)})
            if os.path.exists(pinned):
                os.remove(pinned)
            summary.done = 1
    summary.seconds = time.monotonic() - start
    return summary


__all__ = ["Plan", "PlanError", "RunOptions", "Summary", "SystemicFailure", "pending_clips", "plan_stage", "run_stage"]
