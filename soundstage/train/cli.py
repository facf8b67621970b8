"""``soundstage train``: train (or resume) an audio-visual segmentation model from the caches."""

from __future__ import annotations

import dataclasses
import os
import signal

import click

from soundstage.cache.reader import MissingClip
from soundstage.pipeline.pipeline_file import PipelineError
from soundstage.train.command import audio_table, run_training_command  # noqa: F401 (re-exported)
from soundstage.train.config import ConfigError, TrainConfig, resolve_config
from soundstage.train.cues import CueError
from soundstage.train.launch import launch
from soundstage.train.slurm_job import submit_training


def _name_value(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(f"{item!r}: use NAME=VALUE", param_hint="--recipe-option")
    return name.strip().replace("-", "_"), value.strip()


def _settings(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


@click.command("train")
@click.option(
    "--config",
    "pipeline_file",
    type=click.Path(exists=True, dir_okay=False),
    help="pipeline file: manifest, cache, the stages' parameters and a train: section",
)
@click.option(
    "--recipe",
    help="the method: generic (default; soundstage's own model), bias-in-avs, bias-in-avs-avss, stepping-stones-stage1, "
    "stepping-stones-stage2, segpref (their paper's settings are the defaults; see soundstage.train.recipes)",
)
@click.option(
    "--recipe-option", "recipe_options", multiple=True, metavar="NAME=VALUE", help="a setting of the recipe (repeatable)"
)
@click.option(
    "--init-from",
    type=click.Path(exists=True),
    help="start from these weights: a run's model/ or checkpoint, or a checkpoint the seed code saved (its key layout)",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory (runs/NAME); rerun to resume")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False), help="manifest (default: the pipeline file's)")
@click.option("--cache", type=click.Path(file_okay=False), help="cache root (default: the pipeline file's)")
@click.option(
    "--model",
    help="transformers Mask2Former to start from, e.g. facebook/mask2former-swin-base-ade-semantic "
    "(default: the tiny stand-in config shipped in the package)",
)
@click.option("--audio", help="audio cue: vggish | beats | beats-probs | units | STAGE:FIELD | none")
@click.option("--audio-select", help="which output of the audio stage: FINGERPRINT or key=value,...")
@click.option("--active", help="active queries per frame: active-queries | units | STAGE:FIELD (query ids)")
@click.option(
    "--num-queries", type=click.IntRange(min=1), help="decoder queries (default: the model's; active query ids must be below it)"
)
@click.option("--text-cues/--no-text-cues", default=None, help="queries also attend to the textcues stage's slots")
@click.option("--prior", help="Stepping Stones' mask prior: masks (the masks stage's output) or masks=SELECTOR; none")
@click.option("--prior-train", type=click.Choice(["gt", "masks"]), help="prior of training frames (default gt)")
@click.option("--prior-eval", type=click.Choice(["masks", "gt"]), help="prior of evaluated frames (default masks)")
@click.option("--conditioning", type=click.Choice(["add", "cosine", "none"]), help="how audio enters the queries")
@click.option("--task", type=click.Choice(["binary", "semantic"]))
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1), help="stop after this many optimizer steps")
@click.option("--batch-size", type=click.IntRange(min=1), help="clips per micro-batch")
@click.option("--accumulate", type=click.IntRange(min=1), help="micro-batches per optimizer step")
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--warmup-steps", type=click.IntRange(min=0))
@click.option("--schedule", type=click.Choice(["cosine", "poly", "constant"]))
@click.option("--clip-grad", type=float, help="max gradient norm (0: no clipping)")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "fp64"]))
@click.option("--freeze-backbone/--train-backbone", default=None)
@click.option("--image-size", type=click.IntRange(min=32))
@click.option("--mask-size", type=click.IntRange(min=8))
@click.option(
    "--unlabelled",
    type=click.Choice(["first", "repeat"]),
    help="frames without labels (v1s train): train on frame 0 only, or repeat frame 0 per second",
)
@click.option(
    "--frames",
    type=click.Choice(["auto", "cache", "decode"]),
    help="images from the frames stage's output at the input size (auto: when it holds every clip) or decoded",
)
@click.option("--device", help="cpu, cuda, cuda:1, ... (default auto)")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader worker processes")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's)")
@click.option("--eval-every", type=click.IntRange(min=1), help="epochs between evaluations (and at the end)")
@click.option("--seed", type=int)
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="optimizer steps between checkpoints")
@click.option("--protocol", help="evaluation protocol (default: avsbench-binary / avsbench-semantic)")
@click.option(
    "--probes",
    help="audio replacements scored at each evaluation, comma-separated (default muted,zeroed,swapped,noise:10; '' for none)",
)
@click.option(
    "--select",
    help="the evaluation metric model/best is chosen by (higher is better), e.g. val/avsbench-binary/real-muted/miou "
    "(default: the protocol's mIoU with the real audio, e.g. val/avsbench-binary/miou)",
)
@click.option(
    "--tracker",
    multiple=True,
    type=click.Choice(["tensorboard", "wandb", "mlflow", "none"]),
    help="where metrics also go, repeatable (RUN/tb, offline RUN/wandb, RUN/mlruns or $MLFLOW_TRACKING_URI)  "
    "[default: tensorboard]",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="DDP processes on this machine (one per GPU; gloo on CPU); --batch-size is per process",
)
@click.option("--nnodes", type=click.IntRange(min=1), default=1, help="machines of a multi-node run (one launcher each)")
@click.option("--node-rank", type=click.IntRange(min=0), help="this machine's index (default $SLURM_NODEID, else 0)")
@click.option("--master-addr", help="multi-node: the address of node 0 (the rendezvous)")
@click.option("--master-port", type=click.IntRange(min=1, max=65535), help="multi-node: a free port on node 0")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", help="slurm: submit the training as a job")
@click.option("--nodes", type=click.IntRange(min=1), default=1, help="slurm: nodes")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, help="slurm: GPUs per node, one process each")
@click.option(
    "--cpus-per-node", type=click.IntRange(min=1), help="slurm: CPUs per node (--cpus-per-task of the one task per node)"
)
@click.option("--partition", help="slurm: partition")
@click.option("--time", "time_limit", help="slurm: time limit per run of the job, e.g. 24:00:00 (it requeues itself)")
@click.option("--mem", help="slurm: memory per node, e.g. 64G")
@click.option("--account", help="slurm: account")
@click.option("--qos", help="slurm: QOS")
@click.option("--dry-run", is_flag=True, help="slurm: print the sbatch script and submit nothing")
@click.option("--wait", is_flag=True, help="slurm: follow the job (through requeues) until it ends, then print the scores")
def train(pipeline_file, out, quiet, clip_grad, probes, recipe_options, tracker, **options):
    """Train an audio-conditioned Mask2Former on the manifest's frames and the cached cues.

    The run directory holds config.json, provenance.json, checkpoints/, metrics/*.jsonl,
    curves.png, tb/ (TensorBoard) and model/last, model/best (by --select). Defaults shown are
    the generic recipe's; --recipe NAME brings its paper's. Rerunning the same command resumes from the last checkpoint;
    SIGTERM/SIGUSR1 checkpoint and exit with status 75.

    --nproc N trains on N DDP processes (global batch = --batch-size x N); under torchrun each
    process is a rank by itself. --executor slurm submits the same training as a job that
    requeues itself at its time limit (see the docs, "Running on a cluster")."""
    launcher = {k: options.pop(k) for k in ("nproc", "nnodes", "node_rank", "master_addr", "master_port")}
    cluster = {
        k: options.pop(k)
        for k in ("executor", "nodes", "gpus_per_node", "cpus_per_node", "partition", "time_limit", "mem", "account", "qos")
    }
    dry_run, wait = options.pop("dry_run"), options.pop("wait")
    if probes is not None:
        options["probes"] = [p.strip() for p in probes.split(",") if p.strip()]
    if clip_grad is not None:
        options["clip_grad"] = clip_grad or None
    if tracker:
        options["tracker"] = ["none"] if "none" in tracker else list(tracker)
    if recipe_options:
        options["recipe_options"] = dict(_name_value(item) for item in recipe_options)
    try:
        cfg = resolve_config(pipeline_file, _settings(out=out, **options))
    except (ConfigError, CueError, MissingClip, PipelineError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    ctx = click.get_current_context()
    if cluster["executor"] == "slurm":
        ctx.exit(submit_training(ctx, cfg, cluster, launcher["nproc"], dry_run=dry_run, wait=wait, quiet=quiet))
    given = [name for name in ("nodes", "gpus_per_node", "cpus_per_node", "partition", "time_limit", "mem", "account", "qos")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if dry_run or wait or given:
        options_given = ", ".join(f"--{n.replace('_limit', '').replace('_', '-')}" for n in given) or "--dry-run/--wait"
        raise click.UsageError(f"{options_given}: for --executor slurm")
    if launcher["nproc"] > 1 or launcher["nnodes"] > 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])  # launch() takes them

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise click.UsageError("--nproc: this process is already a rank of a DDP run (torchrun); leave --nproc out")
        node_rank = launcher["node_rank"]
        if node_rank is None:
            node_rank = int(os.environ.get("SLURM_NODEID", 0))
        try:
            code = launch(
                cfg,
                launcher["nproc"],
                nnodes=launcher["nnodes"],
                node_rank=node_rank,
                master_addr=launcher["master_addr"],
                master_port=launcher["master_port"],
                quiet=quiet,
                log=lambda line: click.echo(line, err=True),
            )
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        ctx.exit(code)
    ctx.exit(run_training_command(cfg, quiet))


def _show_defaults(command: click.Command) -> click.Command:
    """Each option that is a training setting shows its default (``TrainConfig``'s, the generic
    recipe's) in --help; the options themselves default to None, "not given", so that a pipeline
    file's or a recipe's value is not overridden."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    for param in command.params:
        if isinstance(param, click.Option) and param.name in defaults and "default" not in (param.help or ""):
            value = defaults[param.name]
            shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
            param.help = f"{param.help or ''}  [default: {shown}]".strip()
    return command


train = _show_defaults(train)
