"""Executors: where the shards of a stage run — on this machine, or as SLURM array jobs.

Both read what is left to do from the cache (clips not yet committed under the stage's
fingerprint) and only run that: a relaunch of the same command submits only the shards that
still miss clips, and a finished stage is skipped. After ``--wait`` the summary also comes from
the cache, never from the scheduler's accounting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import click

from soundstage.cache.store import StageDir
from soundstage.pipeline import slurm
from soundstage.pipeline.freshness import outdated
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import manifest_rows, plan_stage
from soundstage.pipeline.shard import shard_of
from soundstage.pipeline.stage import Stage
from soundstage.pipeline.task_args import stage_cli_args


@dataclass
class StageWork:
    """One stage output to produce: where it goes and what of it is missing."""

    stage: Stage
    params: dict
    upstream_select: dict
    dir: StageDir
    missing: list  # clip ids not committed yet (global stage: ["<result>"] until fitted)
    meta: dict | None = None  # the planned stage.json: written before tasks run, which check it

    @property
    def complete(self) -> bool:
        return not self.missing

    def missing_shards(self, num_shards: int) -> list[int]:
        if self.stage.kind == "global":
            return [0] if self.missing else []
        return sorted({shard_of(cid, num_shards) for cid in self.missing})


def stage_work(stage: Stage, params: dict, upstream_select: dict, stage_dir: StageDir, rows: list[dict],
               meta: dict | None = None, manifest_dir: str | None = None) -> StageWork:
    """What of ``stage_dir`` is missing for ``rows``; with ``manifest_dir``, committed clips whose
    inputs changed since (stale) count as missing too."""
    stale = outdated(stage, stage_dir, rows, manifest_dir, meta) if manifest_dir else set()
    if stage.kind == "global":
        missing = [] if os.path.exists(stage_dir.result_path) and not stale else ["<result>"]
    else:
        done = stage_dir.committed_ids() if stage_dir.exists() else set()
        missing = [r["clip_id"] for r in rows if r["clip_id"] not in done or r["clip_id"] in stale]
    return StageWork(stage, params, upstream_select, stage_dir, missing, meta)


def cache_summary(work: StageWork, rows: list[dict]) -> tuple[str, bool]:
    """How a stage output stands in the cache now: (text, complete without failures)."""
    sd, stage = work.dir, work.stage
    head = f"{stage.name} {os.path.basename(sd.path)}"
    if stage.kind == "global":
        ok = os.path.exists(sd.result_path)
        return f"{head}: {'fitted' if ok else 'NOT fitted'}\n  output: {sd.path}", ok
    done = sd.committed_ids() if sd.exists() else set()
    ids = {r["clip_id"] for r in rows}
    failed = {cid: rec for cid, rec in sd.failures().items() if cid in ids and cid not in done} if sd.exists() else {}
    committed = len(ids & done)
    missing = len(ids) - committed - len(failed)
    lines = [f"{head}: {committed}/{len(ids)} clips committed, {len(failed)} failed, {missing} missing"]
    for cid, rec in list(failed.items())[:10]:
        lines.append(f"  failed {cid}: {rec['cause']}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (records in {sd.failures_dir})")
    lines.append(f"  output: {sd.path}")
    return "\n".join(lines), committed == len(ids)


def job_name(stage_name: str) -> str:
    return f"soundstage-{stage_name}"


def slurm_job(work: StageWork, cli_args: list[str], num_shards: int, resources: dict) -> slurm.SlurmJob:
    """The array job (or single job, for a whole-dataset stage) that finishes ``work``."""
    stage = work.stage
    array = stage.kind != "global"
    shard_ids = work.missing_shards(num_shards) if array else None
    what = (f"shards {slurm.array_spec(shard_ids)} of {num_shards} ({len(work.missing)} clips missing)" if array
            else "one job: whole-dataset stage")
    return slurm.SlurmJob(
        name=job_name(stage.name),
        command=[*slurm.SOUNDSTAGE_COMMAND, stage.name, *cli_args],
        log_dir=os.path.join(work.dir.path, "logs"),
        workdir=os.getcwd(),
        resources=slurm.Resources.merged(stage.resources, resources),
        num_shards=num_shards if array else None,
        shard_ids=shard_ids,
        description=f"soundstage stage {stage.name}, output {work.dir.path}\n{what}",
    )


def submit_and_report(planned: list[tuple[StageWork, slurm.SlurmJob | None]], rows: list[dict], wait: bool, dry_run: bool,
                      cache: str, poll_seconds: float | None, out) -> int:
    """Submit the jobs of the unfinished outputs (complete ones have no job), upstream first and chained with ``afterok``;
    with ``wait`` block until they end, then summarise from the cache.

    An output that still has jobs in the queue (an earlier launch) is not submitted again:
    its dependants wait for those jobs, and so does ``wait``.
    """
    jobs, running = [], {}
    for work, job in planned:
        head = f"{work.stage.name} {os.path.basename(work.dir.path)}"
        if work.complete:
            out(f"{head}: complete in the cache, skipped")
            continue
        queued = slurm.active_jobs(job.log_dir)
        if queued:
            out(f"{head}: job(s) {','.join(queued)} of an earlier launch still queued or running; not submitted again")
            running[job.name] = queued
            continue
        jobs.append((job, [job_name(up.stage) for up in work.stage.upstream]))
    works = [work for work, _ in planned]
    if not jobs and not running:
        out("nothing to submit: every output is complete in the cache")
        return report(works, rows, out) if wait else 0
    if not dry_run:  # the tasks find the planned fingerprint's stage.json and check it
        for work, job in planned:
            if job is not None and work.meta is not None:
                work.dir.initialise(work.meta)
    submission = slurm.submit_jobs(jobs, dry_run=dry_run, out=out, running=running)
    if dry_run:
        return 0
    ids = submission.all_ids()
    if not wait:
        out(f"follow with: squeue -j {','.join(ids)}   and   soundstage status --cache {cache}")
        return 0
    states = slurm.wait_for_jobs(ids, poll_seconds=poll_seconds, log=out)
    bad = {t: s for t, s in states.items() if s != "COMPLETED"}
    if bad:
        log_dirs = {jid: job.log_dir for _, job in planned if job for jid in submission.job_ids.get(job.name, [])}
        logs = sorted({log_dirs[t.split("_")[0]] for t in bad if t.split("_")[0] in log_dirs})
        out(f"{len(bad)} SLURM task(s) did not complete: " + ", ".join(f"{t} {s}" for t, s in sorted(bad.items())[:20])
            + (f" (logs: {', '.join(logs)})" if logs else ""))
    return report(works, rows, out)


def report(works: list[StageWork], rows: list[dict], out) -> int:
    ok = True
    for work in works:
        text, complete = cache_summary(work, rows)
        out(text)
        ok = ok and complete
    return 0 if ok else 1


def launch_stage(stage: Stage, cli_args: list[str], *, manifest: str, cache: str, params: dict, upstream_select: dict | None,
                 executor: str, shards: int, wait: bool, dry_run: bool, resources: dict | None,
                 poll_seconds: float | None = None, out=click.echo, force: bool = False, reuse_fit: str | None = None) -> int:
    """Run one stage command on ``shards`` shards: locally, or as a SLURM array job (``cli_args``
    are the stage command's own arguments; each array task adds ``--shard i/N``). ``force``:
    every clip is to be recomputed (the tasks get ``--force`` through ``cli_args``)."""
    rows, _ = manifest_rows(manifest)
    plan = plan_stage(stage, manifest, cache, params, upstream_select, log=out)
    work = stage_work(stage, plan.params, upstream_select or {}, plan.dir, rows, plan.meta, os.path.dirname(os.path.abspath(manifest)))
    if force:
        work.missing = ["<result>"] if stage.kind == "global" else [r["clip_id"] for r in rows]
    if executor == "local":
        return _run_local([(work, shards)], manifest, cache, dry_run, {"force": force or None, "reuse_fit": reuse_fit}, out)
    cli_args = [*cli_args, "--fingerprint", plan.fingerprint]
    planned = [(work, None if work.complete else slurm_job(work, cli_args, shards, resources or {}))]
    return submit_and_report(planned, rows, wait, dry_run, cache, poll_seconds, out)


def run_pipeline(pipe, targets: list[str] | None, *, executor: str = "local", shards: int | None = None, jobs: int = 1,
                 workers: int | None = None, wait: bool = False, dry_run: bool = False, poll_seconds: float | None = None,
                 out=click.echo) -> int:
    """``soundstage run``: the target stages and their upstream stages, upstream first, each skipped
    when the cache holds it complete. A stage whose clips failed (recorded in the cache) does not
    stop the stages below: they record those clips as failed too and the exit status says so; an
    interrupted or crashed stage does stop them (``afterok`` on SLURM, where array tasks run with
    ``--allow-failed-clips``)."""
    from soundstage.pipeline.resolve import expected_meta

    if not pipe.manifest:
        raise click.UsageError(f"{pipe.path} names no manifest")
    cache = pipe.cache or "cache"
    rows, _ = manifest_rows(pipe.manifest)
    works = []
    for name in pipe.order(targets):
        stage = get_stage(name)
        meta = expected_meta(name, pipe.stages)
        sd = StageDir.at(cache, name, meta["fingerprint"])
        works.append(stage_work(stage, pipe.stages.get(name, {}), pipe.upstream_select(name), sd, rows, meta,
                                os.path.dirname(os.path.abspath(pipe.manifest))))

    if executor == "local":
        plan = [(w, shards or jobs) for w in works]
        return _run_local(plan, pipe.manifest, cache, dry_run, {"workers": workers}, out)

    planned = []
    for w in works:
        name = w.stage.name
        args = stage_cli_args(w.stage, w.params, pipe.manifest, cache, w.upstream_select, {"workers": workers},
                              fingerprint=w.meta["fingerprint"])
        job = None if w.complete else slurm_job(w, args, shards or pipe.shards.get(name) or 1, pipe.resources.get(name, {}))
        planned.append((w, job))
    return submit_and_report(planned, rows, wait, dry_run, cache, poll_seconds, out)


def _run_local(plan: list[tuple[StageWork, int]], manifest: str, cache: str, dry_run: bool, runner_kwargs: dict, out) -> int:
    from soundstage.pipeline.local import run_local

    runner_kwargs = {k: v for k, v in runner_kwargs.items() if v is not None}
    code, ran = 0, False
    for work, processes in plan:
        name = work.stage.name
        if ran and not dry_run:  # what ran above may have changed this stage's inputs: look again
            rows, _ = manifest_rows(manifest)
            work = stage_work(work.stage, work.params, work.upstream_select, work.dir, rows, work.meta,
                              os.path.dirname(os.path.abspath(manifest)))
        if work.complete:
            out(f"{name} {os.path.basename(work.dir.path)}: complete in the cache, skipped")
            continue
        if dry_run:
            out(f"would run {name} {os.path.basename(work.dir.path)} on {len(work.missing)} missing clip(s) "
                f"in {processes} local process(es)")
            continue
        fingerprint = None
        if work.meta is not None:  # planned: the run checks it instead of hashing the models again
            work.dir.initialise(work.meta)
            fingerprint = work.meta["fingerprint"]
        summary = run_local(work.stage, manifest, cache, work.params, work.upstream_select, jobs=processes,
                            fingerprint=fingerprint, **runner_kwargs)
        out(summary.format())
        ran = ran or summary.done > 0
        if summary.interrupted:
            out(f"stopping: {name} was interrupted; stages after it were not run")
            return summary.exit_code
        if summary.failed:
            out(f"note: {len(summary.failed)} clip(s) failed in {name}; the stages below record them as failed too")
            code = summary.exit_code
    return code
