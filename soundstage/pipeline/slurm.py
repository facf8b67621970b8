"""SLURM array jobs: write the sbatch scripts for a stage, submit them in order, wait for them.

SLURM is the engine; this module writes the scripts a person would write by hand (printable
with ``--dry-run`` so they can be read and adapted) and hands them to ``sbatch``:

* a per-clip stage becomes an array job whose task ``t`` runs the ordinary stage command on
  shard ``t + offset`` of ``N`` (``--array=0-(N-1)%P``); arrays longer than the cluster's
  ``MaxArraySize`` are split into several array jobs with offsets;
* a whole-dataset stage (k-means fit) becomes a single job;
* a stage waits for its upstream jobs with ``--dependency=afterok:...``; dependants of a
  failed job are cancelled (``--kill-on-invalid-dep=yes``) instead of pending forever;
* logs go next to the stage output: ``<cache>/<stage>/<fingerprint>/logs/%A_%a.out``.

Completion is read from the cache afterwards, never from ``sacct`` (it needs slurmdbd, which
many clusters and all test installs lack); waiting polls ``squeue``.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: SLURM's own default when slurm.conf sets none
DEFAULT_MAX_ARRAY_SIZE = 1001
#: warn the task 2 minutes before its time limit; ``B:`` signals the batch shell, which ``exec``
#: has replaced by the stage command, so the runner gets it and commits what it finished
DEFAULT_SIGNAL = "B:USR1@120"
#: command that runs a stage in a task: this interpreter, so the task uses the same environment
SOUNDSTAGE_COMMAND = (sys.executable, "-m", "soundstage.cli")

#: squeue states after which a job will not run again (a requeued job goes back to PENDING)
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
}


#: pending reasons after which a job never starts by itself: it asks for more than the partition,
#: its QOS or its account allow per job, or an upstream job it needs has failed
NEVER_REASONS = {
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "DependencyNeverSatisfied",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxGRESPerJob",
    "QOSMaxMemoryPerJob",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
    "AssocMaxCpuPerJobLimit",
    "AssocMaxNodePerJobLimit",
    "AssocMaxWallDurationPerJobLimit",
}


class SlurmError(RuntimeError):
    pass


@dataclass
class Resources:
    """What one task asks the scheduler for. ``None`` leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # SLURM time, e.g. "02:00:00" or "1-00:00:00"
    mem: str | None = None  # per task, e.g. "16G"
    cpus: int | None = None  # --cpus-per-task
    gpus: int | str | None = None  # count, or "type:count" -> --gres=gpu:type:count
    max_parallel: int | None = None  # array throttle: at most this many tasks at once (%P)
    account: str | None = None
    qos: str | None = None
    requeue: bool = True  # let the cluster requeue a preempted task; resume makes it safe
    signal: str | None = DEFAULT_SIGNAL
    extra: list = field(default_factory=list)  # further sbatch options, verbatim ("--constraint=a100")

    @classmethod
    def merged(cls, *layers: Mapping | None) -> Resources:
        """Later layers override earlier ones; ``None`` values do not override."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict = {}
        for layer in layers:
            for key, value in (layer or {}).items():
                key = key.replace("-", "_")
                if key not in names:
                    raise SlurmError(f"unknown resource {key!r}; known: {', '.join(sorted(names))}")
                if value is not None:
                    values[key] = value
        if isinstance(values.get("extra"), str):
            values["extra"] = shlex.split(values["extra"])
        return cls(**values)

    #: field -> sbatch option, in the order they appear in a script; empty values are left out
    OPTIONS = (
        ("partition", "--partition={}"),
        ("account", "--account={}"),
        ("qos", "--qos={}"),
        ("cpus", "--cpus-per-task={}"),
        ("gpus", "--gres=gpu:{}"),
        ("mem", "--mem={}"),
        ("time", "--time={}"),
        ("signal", "--signal={}"),
    )

    def sbatch_options(self) -> list[str]:
        opts = [fmt.format(getattr(self, name)) for name, fmt in self.OPTIONS if getattr(self, name) not in (None, "", 0, "0")]
        return opts + (["--requeue"] if self.requeue else []) + list(self.extra)


@dataclass
class SlurmJob:
    """One stage's work on the cluster: an array over shards, or a single job (``num_shards=None``)."""

    name: str
    command: list  # argv each task runs, without --shard
    log_dir: str
    workdir: str
    resources: Resources
    num_shards: int | None = None
    shard_ids: list | None = None  # the shards to run; default all (a relaunch: the unfinished)
    description: str = ""

    def __post_init__(self):
        if self.num_shards is not None and self.shard_ids is None:
            self.shard_ids = list(range(self.num_shards))


@dataclass
class Submission:
    """What ``submit_jobs`` did: job ids per job name (several when an array was split)."""

    job_ids: dict = field(default_factory=dict)

    def all_ids(self) -> list[str]:
        return [j for ids in self.job_ids.values() for j in ids]


# ------------------------------------------------------------------------------- script text


def array_chunks(shard_ids: Iterable[int], max_array_size: int) -> list[tuple[int, list[int]]]:
    """Group shard ids into arrays whose task ids stay below ``max_array_size``.

    Returns ``(offset, task_ids)`` pairs: task ``t`` of that array runs shard ``t + offset``.
    """
    chunks: dict[int, list[int]] = {}
    for shard in sorted(set(shard_ids)):
        offset = (shard // max_array_size) * max_array_size
        chunks.setdefault(offset, []).append(shard - offset)
    return sorted(chunks.items())


def array_spec(task_ids: Sequence[int], max_parallel: int | None = None) -> str:
    """``[0,1,2,3,7,9,10]`` -> ``"0-3,7,9-10"`` (``%P`` appended when throttled)."""
    ranges, ids = [], sorted(task_ids)
    start = prev = ids[0]
    for t in ids[1:] + [None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if t is not None:
            start = prev = t
    spec = ",".join(ranges)
    return f"{spec}%{int(max_parallel)}" if max_parallel else spec


def _shell_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def render_scripts(job: SlurmJob, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE) -> list[str]:
    """The sbatch script(s) of ``job``: one per array chunk, or one for a single job."""
    header = ["#!/bin/bash"]
    if job.description:
        header += [f"# {line}" for line in job.description.splitlines()]
    common = [f"--job-name={job.name}", f"--chdir={job.workdir}", "--kill-on-invalid-dep=yes"]
    common += job.resources.sbatch_options()
    body = ["set -euo pipefail", "export PYTHONUNBUFFERED=1"]

    if job.num_shards is None:
        opts = [f"--output={os.path.join(job.log_dir, '%j.out')}"] + common
        # exec: the stage command becomes the batch shell and receives SLURM's signals itself
        lines = header + [f"#SBATCH {o}" for o in opts] + body + ["exec " + _shell_command(job.command)]
        return ["\n".join(lines) + "\n"]

    scripts = []
    chunks = array_chunks(job.shard_ids, max_array_size)
    for number, (offset, task_ids) in enumerate(chunks, start=1):
        opts = [
            f"--array={array_spec(task_ids, job.resources.max_parallel)}",
            f"--output={os.path.join(job.log_dir, '%A_%a.out')}",
        ] + common
        note = [f"# array {number} of {len(chunks)}: task t runs shard t+{offset} of {job.num_shards}"] if len(chunks) > 1 else []
        shard = (
            f"$((SLURM_ARRAY_TASK_ID + {offset}))/{job.num_shards}" if offset else f"${{SLURM_ARRAY_TASK_ID}}/{job.num_shards}"
        )
        run = "exec " + _shell_command(job.command) + f' --shard "{shard}"'
        scripts.append("\n".join(header + note + [f"#SBATCH {o}" for o in opts] + body + [run]) + "\n")
    return scripts


#: a command's exit status meaning "stopped on a signal after saving its state; run me again"
STOPPED_STATUS = 75


def render_requeue_script(job: SlurmJob, command: str, setup: Sequence[str] = (), stopped_status: int = STOPPED_STATUS) -> str:
    """A single job that runs ``command`` (shell text) as one ``srun`` step — once per node with
    ``--ntasks-per-node=1`` in ``job.resources.extra`` — and requeues itself when the step stops
    with ``stopped_status`` (state saved, more to do):

    * ``--signal=B:USR1@T`` makes SLURM signal this shell T seconds before the time limit; the
      trap passes USR1 on to the step's tasks (``scancel --signal=USR1``, which reaches the
      tasks and not this shell), which save their state and exit with ``stopped_status``;
      ``scancel --signal=USR1 JOB`` from outside (a preemption hook, a person) reaches the tasks
      directly, with the same result;
    * the shell then runs ``scontrol requeue``: the job goes back to the queue under the same id
      and reruns this script, whose command resumes from the saved state; ``--open-mode=append``
      keeps one log across the runs (each run starts with a line giving its restart count);
    * any other status ends the job with that status (``srun --kill-on-bad-exit`` stops the
      other nodes' tasks when one fails).

    ``setup``: shell lines run first (e.g. finding the rendezvous host)."""
    header = ["#!/bin/bash"] + [f"# {line}" for line in job.description.splitlines()]
    opts = [f"--output={os.path.join(job.log_dir, '%j.out')}", "--open-mode=append", f"--job-name={job.name}"]
    opts += [f"--chdir={job.workdir}", "--kill-on-invalid-dep=yes", *job.resources.sbatch_options()]
    body = [
        "set -uo pipefail",
        "export PYTHONUNBUFFERED=1",
        'echo "job $SLURM_JOB_ID, run ${SLURM_RESTART_COUNT:-0}, on $SLURM_JOB_NODELIST, $(date)"',
        *setup,
        "# USR1 to this shell (time limit ahead): pass it on to the tasks, which checkpoint and exit",
        'trap \'echo "USR1: asking the tasks to save and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"\' USR1',
        f"srun --kill-on-bad-exit=1 {command} &",
        "step=$!",
        "# a trapped signal ends `wait` early: wait until the step has really ended",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; status=$?',
        f'if [ "$status" -eq {stopped_status} ]; then',
        '    echo "stopped with its state saved: requeueing job $SLURM_JOB_ID, $(date)"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(header + [f"#SBATCH {o}" for o in opts] + body) + "\n"


def shell_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell line, each word quoted where needed."""
    return _shell_command(argv)


# ------------------------------------------------------------------------------- talking to SLURM


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is this a SLURM login node? (use --executor local, or --dry-run)") from None
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def max_array_size() -> int:
    """The cluster's MaxArraySize (``scontrol show config``); SLURM's default when unreadable."""
    try:
        text = _run(["scontrol", "show", "config"]).stdout
    except SlurmError:
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def sbatch_argv(script_path: str, after: Sequence[str] = ()) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if after:
        argv.append("--dependency=afterok:" + ":".join(after))
    return argv + [script_path]


def submit_script(script_path: str, after: Sequence[str] = ()) -> str:
    """Submit one script; returns its job id (``sbatch --parsable`` prints ``id[;cluster]``)."""
    out = _run(sbatch_argv(script_path, after)).stdout.strip()
    return out.splitlines()[-1].split(";")[0].strip()


def submit_jobs(
    jobs: list[tuple[SlurmJob, list[str]]],
    dry_run: bool = False,
    out: Callable = print,
    max_array: int | None = None,
    running: Mapping[str, list] | None = None,
) -> Submission:
    """Submit ``(job, names of jobs it needs)`` in the given (dependency) order.

    ``running`` maps names of jobs already in the queue (not submitted again) to their ids:
    dependants wait for them as for new ones. A needed job that is neither (complete) adds no
    dependency. With ``dry_run`` the scripts and their sbatch lines are printed and nothing is
    written or run.
    """
    max_array = max_array or (DEFAULT_MAX_ARRAY_SIZE if dry_run else max_array_size())
    sub = Submission(job_ids={name: list(ids) for name, ids in (running or {}).items()})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for job, needs in jobs:
        after = [j for name in needs for j in sub.job_ids.get(name, [])]
        ids = []
        scripts = render_scripts(job, max_array)
        for k, text in enumerate(scripts):
            path = os.path.join(job.log_dir, f"{job.name}-{stamp}" + (f"-{k}" if len(scripts) > 1 else "") + ".sbatch")
            if dry_run:  # jobs of this dry run appear as <name> in the dependency
                out(f"# --- {job.name}: " + _shell_command(sbatch_argv(path, after)))
                out(text)
                ids.append(f"<{job.name}>")
                continue
            os.makedirs(job.log_dir, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            job_id = submit_script(path, after)
            out(
                f"submitted {job.name} as job {job_id}"
                + (f" (after {':'.join(after)})" if after else "")
                + f"; logs in {job.log_dir}"
            )
            ids.append(job_id)
        sub.job_ids[job.name] = [f"<{job.name}>"] if dry_run else ids
    return sub


def active_jobs(script_dir: str) -> list[str]:
    """Ids of this user's queued or running jobs whose script lies in ``script_dir`` (a stage
    output's logs folder), so a relaunch does not submit the same work twice."""
    try:
        proc = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F|%T|%o"], check=False)
    except SlurmError:
        return []
    ids = []
    for line in proc.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, script = rest.partition("|")
        if script.startswith(script_dir.rstrip(os.sep) + os.sep) and state not in FINISHED_STATES and job not in ids:
            ids.append(job)
    return ids


def job_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """task id -> state for the jobs squeue still knows; None when squeue could not be asked."""
    queue = queue_states(job_ids)
    return None if queue is None else {task: state for task, (state, _) in queue.items()}


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """task id -> (state, reason) for the jobs squeue still knows; None when squeue could not be asked."""
    proc = _run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%F|%i|%T|%r"], check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # all of them are finished and purged
            return {}
        return None
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] in job_ids:
            states[parts[1]] = (parts[2], parts[3])
    return states


def wait_for_jobs(job_ids: Sequence[str], poll_seconds: float | None = None, log: Callable = print) -> dict[str, str]:
    """Block until none of ``job_ids`` (array tasks included) is pending or running.

    squeue is asked every ``poll_seconds`` (default: $SOUNDSTAGE_SLURM_POLL_SECONDS, else 10).

    Returns the last state squeue reported per task (finished jobs leave squeue after the
    cluster's MinJobAge, so a missing task is a finished one — the cache says how it went).
    """
    poll_seconds = poll_seconds or float(os.environ.get("SOUNDSTAGE_SLURM_POLL_SECONDS", 10))
    job_ids = [str(j) for j in job_ids]
    last: dict[str, str] = {}
    shown = None
    failures_in_a_row = 0
    while job_ids:
        queue = queue_states(job_ids)
        if queue is None:
            failures_in_a_row += 1
            if failures_in_a_row >= 30:
                raise SlurmError("squeue has not answered for a long time; the jobs may still run")
        else:
            failures_in_a_row = 0
            # "123_[4-9]" stands for tasks not started yet; they show up by their own ids later
            last = {t: s for t, s in last.items() if "[" not in t}
            last.update({t: state for t, (state, _) in queue.items()})
            active = {t: sr for t, sr in queue.items() if sr[0] not in FINISHED_STATES}
            if not active:
                return last
            stuck = {t: reason for t, (state, reason) in active.items() if state == "PENDING" and reason in NEVER_REASONS}
            if stuck:
                _run(["scancel", *job_ids], check=False)
                reasons = ", ".join(f"{t} {r}" for t, r in sorted(stuck.items())[:5])
                raise SlurmError(
                    f"SLURM says job(s) can never run ({reasons}{_meaning(set(stuck.values()))}); cancelled "
                    f"{','.join(job_ids)}. Ask for less (--cpus, --mem, --gpus, --time or resources: in the pipeline "
                    f"file) or another --partition, then run again: only unfinished work is submitted"
                )
            counts = _count_states(active)
            if counts != shown:
                log("waiting for SLURM jobs " + ",".join(job_ids) + ": " + counts)
                shown = counts
        time.sleep(poll_seconds)
    return last


def _meaning(reasons: set[str]) -> str:
    if reasons & {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit"}:
        return ": more than any node of the partition has, or a longer time than it allows"
    if "DependencyNeverSatisfied" in reasons:
        return ": a job it waits for failed"
    return ""


def _count_states(states: Mapping[str, tuple[str, str]]) -> str:
    """How many tasks are in each state, with the reason SLURM gives for those that wait:
    ``2 pending (Resources), 1 running``."""
    counts: dict[str, int] = {}
    for state, reason in states.values():
        label = state.lower() + (f" ({reason})" if state == "PENDING" and reason not in ("", "None") else "")
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))


# ------------------------------------------------------------------------------- partition limits


@dataclass
class PartitionLimits:
    """The most one task can get in a partition: over its nodes, and its time limit."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int
    time: str | None  # None: no limit

    def describe(self) -> str:
        return f"partition {self.name}: at most {self.cpus} CPUs, {self.mem_mb}M, {self.gpus or 'no'} GPU(s) per node" + (
            f", time {self.time}" if self.time else ""
        )


def partition_limits(partition: str | None = None) -> PartitionLimits | None:
    """Limits of ``partition`` (default: the cluster's default partition) from ``sinfo``; None
    where SLURM cannot be asked."""
    try:
        proc = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G|%l"], check=False)
    except SlurmError:
        return None
    rows = [line.strip().split("|") for line in proc.stdout.splitlines() if line.count("|") == 5]
    if proc.returncode != 0 or not rows:
        return None
    name = partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    mine = [r for r in rows if r[0].rstrip("*") == name]
    if not mine:
        return None
    limit = mine[0][5]
    return PartitionLimits(
        name=name,
        cpus=max(int(r[2].rstrip("+")) for r in mine),
        mem_mb=max(int(r[3].rstrip("+")) for r in mine),
        gpus=max(_gpu_count(r[4]) for r in mine),
        time=None if limit in ("infinite", "UNLIMITED", "n/a") else limit,
    )


def _gpu_count(gres: str) -> int:
    """GPUs in an sinfo gres string such as ``gpu:a100:4(S:0-1),shard:8`` (0 for ``(null)``)."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def mem_mb(value: str | int) -> int:
    """SLURM memory ("32G", "500M", "1T", 2048) in MB."""
    text = str(value).strip().upper()
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def _time_minutes(value: str) -> float:
    """SLURM time ("1-02:00:00", "02:00:00", "30:00", "90") in minutes."""
    days, _, rest = str(value).rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + parts[1] / 60
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return minutes + (float(days) * 24 * 60 if days else 0)


def fit_defaults(defaults: Mapping, given: Mapping, log: Callable = print, what: str = "") -> dict:
    """A stage's default ``defaults`` cut to what the partition can give one task; values the user
    ``given`` are kept as asked (and only warned about). Says what was capped."""
    limits = partition_limits(given.get("partition"))
    if limits is None:
        return dict(defaults)
    fitted, capped, beyond = dict(defaults), [], []
    checks = {
        "cpus": (lambda v: int(v) > limits.cpus, limits.cpus, f"{limits.cpus} CPUs"),
        "mem": (lambda v: mem_mb(v) > limits.mem_mb, f"{limits.mem_mb}M", f"{limits.mem_mb}M"),
        "gpus": (
            lambda v: _gpu_count(f"gpu:{v}") > limits.gpus,
            None if not limits.gpus else limits.gpus,
            f"{limits.gpus} GPU(s)" if limits.gpus else "no GPU",
        ),
        "time": (
            lambda v: limits.time is not None and _time_minutes(v) > _time_minutes(limits.time),
            limits.time,
            f"time {limits.time}",
        ),
    }
    for key, (too_much, cap, text) in checks.items():
        if given.get(key) is not None:
            if too_much(given[key]):
                beyond.append(f"{key} {given[key]} (at most {text})")
        elif defaults.get(key) not in (None, 0, "0") and too_much(defaults[key]):
            fitted[key] = cap
            capped.append(f"{key} {defaults[key]} -> {cap if cap is not None else 'none'}")
    if capped:
        log(f"{what}default resources fitted to {limits.describe()}: {', '.join(capped)}")
    if beyond:
        log(f"{what}warning: asks for more than {limits.describe()}: {', '.join(beyond)}; SLURM will not start it")
    return fitted
