"""``soundstage train --executor slurm``: the training as one SLURM job that requeues itself.

The job (``soundstage.pipeline.slurm.render_requeue_script``) asks for ``--nodes M`` with one
task per node; that task is ``soundstage train ... --nproc P --nnodes M`` — the launcher of
``soundstage.train.launch``, starting P ranks on its node (P = ``--gpus-per-node``, or
``--nproc`` on CPU nodes) — with the rendezvous on the allocation's first node
(``MASTER_ADDR``; port 20000 + job id mod 20000). ``--signal=B:USR1@120`` and ``--requeue``:
two minutes before the time limit the script passes USR1 to the launchers, the ranks agree on a
step, rank 0 writes the checkpoint, all exit with 75, and the script requeues the job, whose
next run resumes from that checkpoint. Everything the job writes is in the run directory:
the script and the log (``RUN/slurm/<job id>.out``, one log across requeues).

The job runs the options given on this command line (paths made absolute), without the cluster
options: printable with ``--dry-run``, readable, and runnable by hand.
"""

from __future__ import annotations

import os
import time

import click
from click.core import ParameterSource

from soundstage.pipeline import slurm
from soundstage.train.command import audio_table
from soundstage.train.config import ConfigError, TrainConfig, resolve_config
from soundstage.train.run_dir import RunDir

#: options of the submitting command that the job's own command does not repeat
NOT_FORWARDED = {
    "executor",
    "nodes",
    "gpus_per_node",
    "cpus_per_node",
    "partition",
    "time_limit",
    "mem",
    "account",
    "qos",
    "dry_run",
    "wait",
    "nproc",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "quiet",
}
PATH_OPTIONS = {"pipeline_file", "out", "manifest", "cache"}
SETUP = (
    "# rendezvous of the ranks: the first node of the allocation",
    'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    "port=$((20000 + SLURM_JOB_ID % 20000))",
)


def given_options(ctx: click.Context) -> list[str]:
    """The options the user typed (not defaults), as arguments for the same command."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name in NOT_FORWARDED or ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        if getattr(param, "is_flag", False):
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        if name in PATH_OPTIONS or (name == "model" and os.path.exists(str(value))):
            value = os.path.abspath(str(value))
        args += [param.opts[0], str(value)]
    return args


def training_job(cfg: TrainConfig, options: list[str], cluster: dict, nproc: int) -> tuple[slurm.SlurmJob, str]:
    """The job and the command its one task per node runs (shell text)."""
    nodes, gpus = cluster["nodes"], cluster["gpus_per_node"]
    per_node = gpus or nproc
    world = nodes * per_node
    argv = [*slurm.SOUNDSTAGE_COMMAND, "train", *options]
    command = slurm.shell_command(argv)
    if world > 1:
        command += f' --nproc {per_node} --nnodes {nodes} --master-addr "$head" --master-port "$port"'
    command += " --quiet"
    resources = slurm.Resources(
        partition=cluster["partition"],
        time=cluster["time_limit"],
        mem=cluster["mem"],
        cpus=cluster["cpus_per_node"],
        gpus=gpus or None,
        account=cluster["account"],
        qos=cluster["qos"],
        extra=[f"--nodes={nodes}", "--ntasks-per-node=1"],
    )
    description = (
        f"soundstage train: run directory {cfg.out}\n"
        f"{nodes} node(s) x {per_node} process(es) = {world} DDP rank(s) ({'NCCL' if gpus else 'gloo'}); "
        f"global batch = {cfg.batch_size} x {cfg.accumulate} x {world} clips\n"
        "at the time limit (USR1 120 s before) the ranks checkpoint and the job requeues itself;\n"
        "its next run resumes from the checkpoint"
    )
    job = slurm.SlurmJob(
        name=f"soundstage-train-{os.path.basename(cfg.out.rstrip(os.sep))}",
        command=argv,
        log_dir=RunDir(cfg.out).file("slurm"),
        workdir=os.getcwd(),
        resources=resources,
        description=description,
    )
    return job, command


def render(cfg: TrainConfig, options: list[str], cluster: dict, nproc: int) -> tuple[slurm.SlurmJob, str]:
    job, command = training_job(cfg, options, cluster, nproc)
    return job, slurm.render_requeue_script(job, command, setup=SETUP)


def submit_training(
    ctx: click.Context,
    cfg: TrainConfig,
    cluster: dict,
    nproc: int,
    *,
    dry_run: bool,
    wait: bool,
    quiet: bool = False,
    after: list[str] | None = None,
) -> int:
    """Write and submit the job (print it with ``dry_run``); with ``wait`` follow it through its
    requeues and print the last evaluation. Returns the exit status."""
    if cluster["gpus_per_node"] and nproc > 1 and nproc != cluster["gpus_per_node"]:
        raise click.UsageError("--nproc and --gpus-per-node disagree: on GPU nodes there is one process per GPU")
    job, text = render(cfg, given_options(ctx), cluster, nproc)
    path = os.path.join(job.log_dir, f"train-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    if dry_run:
        click.echo("# " + slurm.shell_command(slurm.sbatch_argv(path, after or [])))
        click.echo(text, nl=False)
        return 0
    try:
        queued = slurm.active_jobs(job.log_dir)
        if queued:
            click.echo(
                f"job(s) {','.join(queued)} of an earlier submission for {cfg.out} still queued or running; not submitted again"
            )
            job_id = queued[0]
        else:
            os.makedirs(job.log_dir, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            job_id = slurm.submit_script(path, after or [])
            click.echo(f"submitted the training as job {job_id}; log: {os.path.join(job.log_dir, job_id + '.out')}")
        if not wait:
            click.echo(f"follow with: squeue -j {job_id}")
            return 0
        states = slurm.wait_for_jobs([job_id], log=click.echo)
    except slurm.SlurmError as e:
        raise click.ClickException(str(e)) from None
    run = RunDir(cfg.out)
    if not run.done:
        state = states.get(job_id, "finished")
        click.echo(
            f"job {job_id} ended ({state}) before the run finished; log: {os.path.join(job.log_dir, job_id + '.out')}",
            err=True,
        )
        return 1
    records = run.records("epochs.jsonl")
    click.echo(f"run: {cfg.out}")
    if records:
        click.echo(audio_table(records[-1]))
    return 0


#: keys of the ``step:`` mapping of a pipeline file's ``train:`` section (the submit options)
STEP_KEYS = ("nodes", "gpus_per_node", "nproc", "cpus_per_node", "partition", "time", "mem", "account", "qos")


def pipeline_step(pipe):
    """The ``train`` step of ``soundstage run PIPELINE.yaml --executor slurm``: the pipeline file's
    ``train:`` section with a ``step:`` mapping is submitted as the training job, ``afterok`` on
    every stage job of the same launch (it starts once the caches it reads are complete)::

        train:
          out: runs/avs-vggish       # the run directory (relative to where `soundstage run` runs)
          audio: vggish
          epochs: 20
          step: {nodes: 1, gpus_per_node: 4, time: "24:00:00", partition: gpu}

    The job runs ``soundstage train --config PIPELINE.yaml`` (the same section) on the step's
    resources, exactly as ``soundstage train --config PIPELINE.yaml --executor slurm`` would."""
    step = {k.replace("-", "_"): v for k, v in (pipe.train.get("step") or {}).items()}
    unknown = sorted(set(step) - set(STEP_KEYS))
    if unknown:
        raise click.ClickException(
            f"{pipe.path}: train: step: unknown key(s) {', '.join(unknown)}; known: {', '.join(STEP_KEYS)}"
        )
    try:
        cfg = resolve_config(pipe.path, {})
    except ConfigError as e:
        raise click.ClickException(f"{pipe.path}: train: {e}") from None
    cluster = {
        "executor": "slurm",
        "nodes": int(step.get("nodes", 1)),
        "gpus_per_node": int(step.get("gpus_per_node", 0)),
        "cpus_per_node": step.get("cpus_per_node"),
        "partition": step.get("partition"),
        "time_limit": step.get("time"),
        "mem": step.get("mem"),
        "account": step.get("account"),
        "qos": step.get("qos"),
    }
    nproc = int(step.get("nproc", 1))

    def submit(after: list[str], dry_run: bool, out) -> list[str]:
        job, text = render(cfg, ["--config", pipe.path], cluster, nproc)
        path = os.path.join(job.log_dir, f"train-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
        if dry_run:
            out("# --- train: " + slurm.shell_command(slurm.sbatch_argv(path, after)))
            out(text)
            return ["<train>"]
        queued = slurm.active_jobs(job.log_dir)
        if queued:
            out(f"train {cfg.out}: job(s) {','.join(queued)} of an earlier launch still queued or running; not submitted again")
            return queued
        if RunDir(cfg.out).done:
            out(f"train {cfg.out}: the run is complete, skipped")
            return []
        os.makedirs(job.log_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        job_id = slurm.submit_script(path, after)
        out(f"submitted train as job {job_id}" + (f" (after {':'.join(after)})" if after else "") + f"; log in {job.log_dir}")
        return [job_id]

    return submit
