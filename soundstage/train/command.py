"""Running a training in this process (one rank of a DDP run when the environment says so) and
printing its result: shared by ``soundstage train``, the DDP launcher and the SLURM job."""

from __future__ import annotations

import os

import click

from soundstage.cache.reader import MissingClip
from soundstage.device import DeviceError
from soundstage.pipeline.pipeline_file import PipelineError
from soundstage.train.checkpoint import CheckpointError
from soundstage.train.config import ConfigError
from soundstage.train.cues import CueError
from soundstage.train.distributed import Distributed
from soundstage.train.loop import Stopped, hold_stop_signals
from soundstage.train.loop import train as run_training


def run_training_command(cfg, quiet: bool = False) -> int:
    """Train (or resume) ``cfg`` in this process — one rank of a DDP run when the environment
    says so — and print the last evaluation (rank 0). Returns 0, or 75 when stopped by a signal;
    user mistakes raise ``click.ClickException`` (in a launched rank: printed by rank 0, status 1)."""
    hold_stop_signals()  # the loop takes them (a stop before it starts is kept for it)
    dist = Distributed.from_env()
    try:
        result = run_training(cfg, log=click.echo, progress=not quiet, dist=dist)
    except Stopped as e:
        if dist.main:
            click.echo(str(e), err=True)
        return 75
    except (ConfigError, CueError, MissingClip, PipelineError, FileNotFoundError, DeviceError, CheckpointError) as e:
        if "SOUNDSTAGE_LAUNCHER" not in os.environ:
            raise click.ClickException(str(e)) from None
        if dist.main:
            click.ClickException(str(e)).show()
        return 1
    if result and dist.main:
        click.echo(f"run: {cfg.out}")
        click.echo(audio_table(result))
    return 0


def audio_table(record: dict) -> str:
    """An evaluation record (by default the last), one line per audio variant; its header names
    the split and the epoch (or the weights, when the record says which)."""
    scored = record.get("weights") or f"epoch {record.get('epoch')}"
    lines = [f"{'audio':<12} {'mIoU':>8} {'F':>8}   ({record.get('split')}, {scored})"]
    for variant, result in record.get("eval", {}).items():
        lines.append(f"{variant:<12} {result.get('miou', float('nan')):>8.4f} {result.get('fscore', float('nan')):>8.4f}")
    results = record.get("eval", {})
    for other in ("muted", "swapped"):  # how much the model listens: it must lose accuracy without its audio
        if "real" in results and other in results:
            gap = [results["real"].get(k, float("nan")) - results[other].get(k, float("nan")) for k in ("miou", "fscore")]
            lines.append(f"{'real-' + other:<12} {gap[0]:>8.4f} {gap[1]:>8.4f}")
    return "\n".join(lines)
