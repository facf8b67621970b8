"""Executors: where the shards of a stage run — on this machine, or as SLURM array jobs.

A run is a list of ``StageWork`` (one stage output each, upstream first), planned from the
cache: which clips of the output are not committed yet (``output_status``) or whose inputs
changed since (stale). An executor runs a list of works, waits when asked, and reports:
``LocalExecutor`` runs them here one after the other, ``SlurmExecutor`` submits one array job
per unfinished output (a single job for a whole-dataset stage), chained with ``afterok``. Both
run only what is missing: a relaunch of the same command submits only the shards that still
miss clips, and a finished stage is skipped. After ``--wait`` the summary also comes from the
cache, never from the scheduler's accounting.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import click

import soundstage.pipeline.slurm as slurm
from soundstage.cache.digest import use_input_digest
from soundstage.cache.index import output_status
from soundstage.cache.store import StageDir, StageStatus
from soundstage.pipeline.freshness import STALE_RESULT, outdated
from soundstage.pipeline.local import run_local
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import expected_meta
from soundstage.pipeline.runner import manifest_rows, plan_stage
from soundstage.pipeline.shard import shard_of
from soundstage.pipeline.stage import Stage
from soundstage.pipeline.task_args import stage_cli_args
from soundstage.pipeline.task_plan import manifest_stamp, write_task_plans


@dataclass
class StageWork:
    """One stage output to produce: where it goes, what of it is left, and how to run it."""

    stage: Stage
    params: dict
    upstream_select: dict
    dir: StageDir
    status: StageStatus  # of the manifest's clips
    stale: set = field(default_factory=set)  # committed clips whose inputs changed since (whole-dataset: non-empty)
    meta: dict | None = None  # the planned stage.json: written before tasks run, which check it
    force: bool = False  # recompute everything
    shards: int = 1  # SLURM array size, or local processes
    cli_args: list = field(default_factory=list)  # the stage command's arguments for SLURM tasks
    resources: dict = field(default_factory=dict)  # SLURM resources of this stage

    @property
    def whole_dataset(self) -> bool:
        return self.stage.kind == "global"

    @property
    def complete(self) -> bool:
        return not self.force and self.status.complete and not self.stale

    @property
    def missing(self) -> list:
        """Clip ids to compute (empty for a whole-dataset output: see ``complete``)."""
        if self.whole_dataset:
            return []
        if self.force:
            return list(self.status.clip_ids)
        return [cid for cid in self.status.clip_ids if cid not in self.status.done or cid in self.stale]

    def missing_shards(self, num_shards: int) -> list[int]:
        if self.whole_dataset:
            return [] if self.complete else [0]
        return sorted({shard_of(cid, num_shards) for cid in self.missing})

    def describe_missing(self) -> str:
        return "the whole-dataset result" if self.whole_dataset else f"{len(self.missing)} missing clip(s)"


def stage_work(
    stage: Stage,
    params: dict,
    upstream_select: dict,
    stage_dir: StageDir,
    rows: list[dict],
    meta: dict | None = None,
    manifest_dir: str | None = None,
    **how,
) -> StageWork:
    """What of ``stage_dir`` is left for ``rows``; with ``manifest_dir``, committed clips whose
    inputs changed since (stale) count as left too. ``how``: the other ``StageWork`` fields."""
    stale = outdated(stage, stage_dir, rows, manifest_dir, meta) if manifest_dir else set()
    status = output_status(stage_dir, [r["clip_id"] for r in rows], whole_dataset=stage.kind == "global")
    return StageWork(stage, params, upstream_select, stage_dir, status, set(stale), meta, **how)


def cache_summary(work: StageWork, rows: list[dict]) -> tuple[str, bool]:
    """How a stage output stands in the cache now: (text, complete without failures)."""
    sd = work.dir
    head = f"{work.stage.name} {os.path.basename(sd.path)}"
    status = output_status(sd, [r["clip_id"] for r in rows], whole_dataset=work.whole_dataset)
    if status.whole_dataset:
        return f"{head}: {'fitted' if status.fitted else 'NOT fitted'}\n  output: {sd.path}", status.fitted
    total = len(status.clip_ids)
    lines = [f"{head}: {len(status.done)}/{total} clips committed, {len(status.failed)} failed, {status.never_tried} missing"]
    for cid, rec in list(status.failed.items())[:10]:
        lines.append(f"  failed {cid}: {rec['cause']}")
    if len(status.failed) > 10:
        lines.append(f"  ... and {len(status.failed) - 10} more (records in {sd.failures_dir})")
    lines.append(f"  output: {sd.path}")
    return "\n".join(lines), status.complete


def report(works: list[StageWork], rows: list[dict], out) -> int:
    ok = True
    for work in works:
        text, complete = cache_summary(work, rows)
        out(text)
        ok = ok and complete
    return 0 if ok else 1


def job_name(stage_name: str) -> str:
    return f"soundstage-{stage_name}"


def slurm_job(work: StageWork, out=print) -> slurm.SlurmJob:
    """The array job (or single job, for a whole-dataset stage) that finishes ``work``; the stage's
    default resources are cut to what the partition has (``out`` says what was capped)."""
    stage, array = work.stage, not work.whole_dataset
    shard_ids = work.missing_shards(work.shards) if array else None
    what = (
        f"shards {slurm.array_spec(shard_ids)} of {work.shards} ({len(work.missing)} clips missing)"
        if array
        else "one job: whole-dataset stage"
    )
    return slurm.SlurmJob(
        name=job_name(stage.name),
        command=[*slurm.SOUNDSTAGE_COMMAND, stage.name, *work.cli_args],
        log_dir=os.path.join(work.dir.path, "logs"),
        workdir=os.getcwd(),
        resources=slurm.Resources.merged(
            slurm.fit_defaults(stage.resources, work.resources, out, f"{stage.name}: "), work.resources
        ),
        num_shards=work.shards if array else None,
        shard_ids=shard_ids,
        description=f"soundstage stage {stage.name}, output {work.dir.path}\n{what}",
    )


# ------------------------------------------------------------------------------- executors


@dataclass
class Executor:
    """Runs a list of works (upstream first) and reports; ``run`` returns the exit status."""

    manifest: str
    cache: str
    dry_run: bool = False
    out: object = click.echo

    def run(self, works: list[StageWork]) -> int:
        raise NotImplementedError

    @functools.cached_property
    def manifest_read(self) -> tuple[list, list, list]:
        """(stamp, usable rows, unusable rows) of the manifest, read once per run: each stage of a
        pipeline looks at it again, and the SLURM planner writes the tasks' rows from it."""
        stamp = manifest_stamp(self.manifest)  # before reading: a change while reading shows as a change
        rows, bad = manifest_rows(self.manifest)
        return stamp, rows, bad

    @property
    def clip_rows(self) -> list[dict]:
        return self.manifest_read[1]


@dataclass
class LocalExecutor(Executor):
    """Each output in turn on this machine, in ``work.shards`` processes. A stage whose clips
    failed does not stop the ones below (they record those clips as failed too); an
    interrupted stage does."""

    runner_options: dict = field(default_factory=dict)  # passed to the runner (workers, force, ...)

    def run(self, works: list[StageWork]) -> int:
        options = {k: v for k, v in self.runner_options.items() if v is not None}
        code, ran = 0, False
        for work in works:
            name = work.stage.name
            if ran and not self.dry_run:  # what ran above may have changed this stage's inputs: look again
                work = refreshed(work, self.clip_rows, self.manifest)
            if work.complete:
                self.out(f"{name} {os.path.basename(work.dir.path)}: complete in the cache, skipped")
                continue
            if self.dry_run:
                self.out(
                    f"would run {name} {os.path.basename(work.dir.path)} on {work.describe_missing()} "
                    f"in {work.shards} local process(es)"
                )
                continue
            fingerprint = None
            if work.meta is not None:  # planned: the run checks it instead of hashing the models again
                work.dir.initialise(work.meta)
                fingerprint = work.meta["fingerprint"]
            summary = run_local(
                work.stage,
                self.manifest,
                self.cache,
                work.params,
                work.upstream_select,
                jobs=work.shards,
                fingerprint=fingerprint,
                **options,
            )
            self.out(summary.format())
            ran = ran or summary.done > 0
            if summary.interrupted:
                self.out(f"stopping: {name} was interrupted; stages after it were not run")
                return summary.exit_code
            if summary.failed:
                self.out(f"note: {len(summary.failed)} clip(s) failed in {name}; the stages below record them as failed too")
                code = summary.exit_code
        return code


@dataclass
class SlurmExecutor(Executor):
    """One array job per unfinished output (complete ones have none), chained with ``afterok``;
    with ``wait``, block until they end, then summarise from the cache. An output that still has
    jobs in the queue (an earlier launch) is not submitted again: its dependants wait for those
    jobs, and so does ``wait``."""

    wait: bool = False
    poll_seconds: float | None = None
    #: jobs submitted after every stage job (``afterok`` on all of them): callables
    #: ``(after_ids, dry_run, out) -> job ids`` (the pipeline file's follow-up steps, see ``pipeline_steps``)
    followers: list = field(default_factory=list)

    def run(self, works: list[StageWork]) -> int:
        out = self.out
        works = with_upstream_changes(works)
        planned = [(work, None if work.complete else slurm_job(work, out)) for work in works]
        jobs, running = [], {}
        for work, job in planned:
            head = f"{work.stage.name} {os.path.basename(work.dir.path)}"
            if job is None:
                out(f"{head}: complete in the cache, skipped")
                continue
            queued = slurm.active_jobs(job.log_dir)
            if queued:
                out(f"{head}: job(s) {','.join(queued)} of an earlier launch still queued or running; not submitted again")
                running[job.name] = queued
                continue
            jobs.append((job, [job_name(up.stage) for up in work.stage.upstream]))
        if not jobs and not running and not self.followers:
            out("nothing to submit: every output is complete in the cache")
            return report(works, self.clip_rows, out) if self.wait else 0
        if not self.dry_run:  # the tasks find the planned fingerprint's stage.json and check it
            submitting = {job.name for job, _ in jobs}
            for work, job in planned:
                if job is not None and work.meta is not None:
                    work.dir.initialise(work.meta)
                if job is not None and job.name in submitting and job.shard_ids:  # each task reads its own rows
                    plan = write_task_plans(
                        work.dir.path, self.manifest, work.stage, work.shards, job.shard_ids, read=self.manifest_read
                    )
                    job.command += ["--task-plan", plan]
        submission = slurm.submit_jobs(jobs, dry_run=self.dry_run, out=out, running=running)
        stage_ids = submission.all_ids()
        follower_ids = [j for follow in self.followers for j in follow(stage_ids, self.dry_run, out)]
        if self.dry_run:
            return 0
        ids = stage_ids + follower_ids
        if not self.wait:
            out(f"follow with: squeue -j {','.join(ids)}   and   soundstage status --cache {self.cache}")
            return 0
        states = slurm.wait_for_jobs(ids, poll_seconds=self.poll_seconds, log=out)
        bad = {t: s for t, s in states.items() if s != "COMPLETED"}
        if bad:
            log_dirs = {jid: job.log_dir for _, job in planned if job for jid in submission.job_ids.get(job.name, [])}
            logs = sorted({log_dirs[t.split("_")[0]] for t in bad if t.split("_")[0] in log_dirs})
            out(
                f"{len(bad)} SLURM task(s) did not complete: "
                + ", ".join(f"{t} {s}" for t, s in sorted(bad.items())[:20])
                + (f" (logs: {', '.join(logs)})" if logs else "")
            )
        return report(works, self.clip_rows, out)


def with_upstream_changes(works: list[StageWork]) -> list[StageWork]:
    """``works`` (upstream first) with the clips that upstream jobs of this same submission will
    recompute counted as stale below them. A SLURM submission decides every output's work before
    any job runs; without this, a stage whose upstream clips are recomputed (their inputs changed)
    would be skipped as complete and stay stale until the next launch. Its tasks still decide at
    run time what is stale: a clip whose inputs did not change after all is found cached."""
    changing: dict[str, set | None] = {}  # stage -> clip ids this submission recomputes (None: all)
    out = []
    for work in works:
        upstream = [changing[u.stage] for u in work.stage.upstream if u.stage in changing]
        if upstream:
            clips = None if None in upstream else set().union(*upstream)
            if work.whole_dataset and (clips is None or clips):  # its fit key moves with any upstream clip
                work = dataclasses.replace(work, stale=work.stale | {STALE_RESULT})
            elif clips is None or clips:
                committed = work.status.done if clips is None else work.status.done & clips
                work = dataclasses.replace(work, stale=work.stale | set(committed))
        out.append(work)
        if not work.complete:
            changing[work.stage.name] = None if work.whole_dataset else set(work.missing)
    return out


def refreshed(work: StageWork, rows: list[dict], manifest: str) -> StageWork:
    """``work`` with what is left read again from the cache."""
    again = stage_work(work.stage, work.params, work.upstream_select, work.dir, rows, work.meta, _manifest_dir(manifest))
    return dataclasses.replace(work, status=again.status, stale=again.stale)


def _manifest_dir(manifest: str) -> str:
    return os.path.dirname(os.path.abspath(manifest))


# ------------------------------------------------------------------------------- entry points


def launch_stage(
    stage: Stage,
    cli_args: list[str],
    *,
    manifest: str,
    cache: str,
    params: dict,
    upstream_select: dict | None,
    executor: str,
    shards: int,
    wait: bool,
    dry_run: bool,
    resources: dict | None,
    poll_seconds: float | None = None,
    out=click.echo,
    force: bool = False,
    reuse_fit: str | None = None,
) -> int:
    """Run one stage command on ``shards`` shards: locally, or as a SLURM array job (``cli_args``
    are the stage command's own arguments; each array task adds ``--shard i/N``). ``force``:
    every clip is to be recomputed (the tasks get ``--force`` through ``cli_args``)."""
    if executor == "local":
        runner = LocalExecutor(manifest, cache, dry_run, out, runner_options={"force": force or None, "reuse_fit": reuse_fit})
    else:
        runner = SlurmExecutor(manifest, cache, dry_run, out, wait=wait, poll_seconds=poll_seconds)
    plan = plan_stage(stage, manifest, cache, params, upstream_select, log=out)
    work = stage_work(
        stage,
        plan.params,
        upstream_select or {},
        plan.dir,
        runner.clip_rows,
        plan.meta,
        _manifest_dir(manifest),
        force=force,
        shards=shards,
        cli_args=[*cli_args, "--fingerprint", plan.fingerprint],
        resources=resources or {},
    )
    return runner.run([work])


def run_pipeline(
    pipe,
    targets: list[str] | None,
    *,
    executor: str = "local",
    shards: int | None = None,
    jobs: int = 1,
    workers: int | None = None,
    wait: bool = False,
    dry_run: bool = False,
    poll_seconds: float | None = None,
    out=click.echo,
) -> int:
    """``soundstage run``: the target stages and their upstream stages, upstream first, each skipped
    when the cache holds it complete. A stage whose clips failed (recorded in the cache) does not
    stop the stages below: they record those clips as failed too and the exit status says so; an
    interrupted or crashed stage does stop them (``afterok`` on SLURM, where array tasks run with
    ``--allow-failed-clips``)."""
    if not pipe.manifest:
        raise click.UsageError(f"{pipe.path} names no manifest")
    cache = pipe.cache or "cache"
    use_input_digest(pipe.input_digest)  # the file's setting, for every stage and task
    if executor == "local":
        runner = LocalExecutor(pipe.manifest, cache, dry_run, out, runner_options={"workers": workers})
    else:
        runner = SlurmExecutor(pipe.manifest, cache, dry_run, out, wait=wait, poll_seconds=poll_seconds)
    works = []
    for name in pipe.order(targets):
        stage = get_stage(name)
        meta = expected_meta(name, pipe.stages)
        params, select = pipe.stages.get(name, {}), pipe.upstream_select(name)
        how = (
            {"shards": shards or jobs}
            if executor == "local"
            else {
                "shards": shards or pipe.shards.get(name) or 1,
                "resources": pipe.resources.get(name, {}),
                "cli_args": stage_cli_args(
                    stage, params, pipe.manifest, cache, select, {"workers": workers}, fingerprint=meta["fingerprint"]
                ),
            }
        )
        works.append(
            stage_work(
                stage,
                params,
                select,
                StageDir.at(cache, name, meta["fingerprint"]),
                runner.clip_rows,
                meta,
                _manifest_dir(pipe.manifest),
                **how,
            )
        )
    if executor != "local" and targets is None:
        runner.followers = pipeline_steps(pipe)
    return runner.run(works)


#: entry point group of the pipeline file's follow-up steps: a top-level section ``NAME:`` with a
#: ``step:`` mapping is submitted, after every stage job, by the builder registered as ``NAME``
#: (``builder(pipe) -> (after_ids, dry_run, out) -> job ids``); ``train`` is one
STEP_ENTRY_POINTS = "soundstage.steps"


def pipeline_steps(pipe) -> list:
    """The follow-up steps the pipeline file asks for (``soundstage run --executor slurm``)."""
    sections = {"train": pipe.train}
    wanted = [name for name, section in sections.items() if isinstance(section, dict) and section.get("step")]
    builders = {ep.name: ep for ep in entry_points(group=STEP_ENTRY_POINTS)}
    steps = []
    for name in wanted:
        if name not in builders:
            raise click.ClickException(f"{pipe.path}: {name}: step: no installed step builder named {name!r}")
        steps.append(builders[name].load()(pipe))
    return steps
