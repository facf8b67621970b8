"""Turning a stage declaration into its click subcommand.

Every stage gets the same runner options (manifest, cache, shard, jobs, workers, ...), one
selector option per upstream stage (``--hubert layer=9``), the executor options, and one option
per declared parameter. Values come from the command line, else the pipeline file (``--config``),
else the declaration's default.
"""

from __future__ import annotations

import os
import re

import click
from click.core import ParameterSource

from soundstage.cache.digest import use_input_digest
from soundstage.pipeline.executors import launch_stage
from soundstage.pipeline.local import run_local
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.pipeline.resolve import expected_fingerprint
from soundstage.pipeline.stage import Param, Stage
from soundstage.pipeline.task_args import flag_name as _flag_name
from soundstage.pipeline.task_args import stage_cli_args

# The runner's own options, shared by every stage: name -> click option arguments.
RUNNER_OPTIONS = {
    "manifest": dict(
        type=click.Path(dir_okay=False), envvar="SOUNDSTAGE_MANIFEST", help="manifest CSV/Parquet (one row per clip)"
    ),
    "cache": dict(
        type=click.Path(file_okay=False), envvar="SOUNDSTAGE_CACHE", default="cache", show_default=True, help="cache root"
    ),
    "config": dict(
        type=click.Path(exists=True, dir_okay=False),
        help="pipeline YAML: manifest, cache and stage parameters (options override it)",
    ),
    "shard": dict(type=str, help="run shard INDEX/COUNT only (default: from SLURM_ARRAY_TASK_ID, else all)"),
    "jobs": dict(
        type=click.IntRange(min=1), default=1, show_default=True, help="run this many local shards in parallel processes"
    ),
    "workers": dict(
        type=click.IntRange(min=0),
        default=min(4, os.cpu_count() or 1),
        show_default=True,
        help="decoding worker processes per shard (0: decode inline)",
    ),
    "batch_size": dict(type=click.IntRange(min=1), help="clips per model call (default: the stage's)"),
    "commit_every": dict(type=click.IntRange(min=1), default=256, show_default=True, help="clips per committed part file"),
    "progress": dict(default=True, show_default=True, help="show a progress bar"),
    "max_consecutive_errors": dict(
        type=click.IntRange(min=0),
        default=20,
        show_default=True,
        help="stop when this many clips in a row fail with errors that are not about their "
        "input (a broken model or GPU, not a bad clip); 0: never stop",
    ),
    "force": dict(is_flag=True, help="recompute every selected clip (or refit), even those cached with the same inputs"),
    "reuse_fit": dict(
        type=str,
        help="whole-dataset stage: keep the stored fit with this fit key or fingerprint "
        "(prefix) although the manifest's clips changed since it was fitted",
    ),
    "fingerprint": dict(
        type=str,
        help="the output planned when the run was submitted (array tasks): its stage.json "
        "is checked against these options instead of hashing the models again",
    ),
    "task_plan": dict(
        type=click.Path(file_okay=False),
        help="the planner's directory of per-task rows (array tasks): this task's rows are read "
        "from there instead of the manifest, unless the manifest changed since",
    ),
    "input_digest": dict(
        type=click.Choice(["stat", "content"]),
        envvar="SOUNDSTAGE_INPUT_DIGEST",
        help="how input files count in each clip's input digest: size + mtime (stat, the default), or "
        "their content hash (for file systems where a replaced file keeps its size and mtime; each file "
        "is hashed once, then looked up). Switching recomputes every clip once",
    ),
    "allow_failed_clips": dict(
        is_flag=True,
        help="exit 0 when every clip was tried and the only problems are "
        "recorded clip failures (pipeline jobs use this, so one bad clip does not stop "
        "the stages below; they record it as failed too)",
    ),
}

# Options that say where and how to run, passed to the executors rather than the runner.
EXECUTOR_OPTIONS = {
    "executor": dict(type=click.Choice(["local", "slurm"]), default="local", show_default=True, help="where shards run"),
    "shards": dict(type=click.IntRange(min=1), help="number of shards (SLURM array tasks, or local processes)"),
    "wait": dict(is_flag=True, help="block until submitted jobs finish, then print the summary"),
    "dry_run": dict(is_flag=True, help="print the sbatch scripts without submitting"),
    "partition": dict(type=str, help="SLURM partition"),
    "time": dict(type=str, help="SLURM time limit, e.g. 4:00:00"),
    "mem": dict(type=str, help="SLURM memory per task, e.g. 32G"),
    "cpus": dict(type=int, help="CPUs per task"),
    "gpus": dict(
        type=click.STRING, callback=lambda ctx, param, value: _gpus(value), help="GPUs per task: COUNT or TYPE:COUNT (a100:2)"
    ),
    "max_parallel": dict(type=click.IntRange(min=1), help="at most this many array tasks at once (%P)"),
}

RESERVED = set(RUNNER_OPTIONS) | set(EXECUTOR_OPTIONS)
#: options about clips and shards: a whole-dataset stage (one fit) hides them, and refuses the ones
#: a user would expect to change what runs (array tasks still pass the others: they do no harm)
PER_CLIP_OPTIONS = {
    "shard",
    "jobs",
    "workers",
    "batch_size",
    "commit_every",
    "max_consecutive_errors",
    "allow_failed_clips",
    "task_plan",
    "shards",
    "max_parallel",
}
REFUSED_FOR_WHOLE_DATASET = ("shard", "jobs", "shards")


def _gpus(value: str | None) -> str | None:
    """``--gpus`` as SLURM's gres takes it: a count, or ``type:count`` (as a pipeline file's resources)."""
    if value is None or re.fullmatch(r"(?:[A-Za-z0-9_.-]+:)?\d+", value.strip()):
        return value and value.strip()
    raise click.BadParameter(f"{value!r}: give a count (2) or TYPE:COUNT (a100:2)", param_hint="--gpus")


def _make_option(name: str, spec: dict, hidden: bool = False) -> click.Option:
    spec = dict(spec, hidden=hidden)
    if spec.get("default") is True or spec.get("default") is False and not spec.get("is_flag"):
        return click.Option([f"--{_flag_name(name)}/--no-{_flag_name(name)}", name], **spec)
    return click.Option([f"--{_flag_name(name)}", name], **spec)


def _upstream_dest(stage_name: str) -> str:
    return "upstream__" + stage_name.replace("-", "_")


def _param_option(p: Param) -> click.Option:
    kwargs = dict(help=p.help, show_default=True, default=p.default)
    if p.is_flag:
        return click.Option([f"{p.option}/--no-{_flag_name(p.name)}", p.name], **kwargs)
    if p.choices:
        kwargs["type"] = click.Choice(list(p.choices))
    elif p.type in (int, float, str, bool) or isinstance(p.type, click.ParamType):
        kwargs["type"] = p.type
    if p.multiple:
        kwargs["multiple"] = True
        kwargs["default"] = tuple(p.default or ())
    return click.Option([p.option, p.name], **kwargs)


def stage_command(stage: Stage) -> click.Command:
    clash = RESERVED & {p.name for p in stage.params}
    if clash:
        raise ValueError(f"stage {stage.name}: parameter name(s) {sorted(clash)} are runner options")
    whole_dataset = stage.kind == "global"
    options = [_make_option(n, s, whole_dataset and n in PER_CLIP_OPTIONS) for n, s in RUNNER_OPTIONS.items()]
    options += [
        click.Option(
            [f"--{up.stage}", _upstream_dest(up.stage)],
            type=str,
            help=f"which {up.stage} output to read: FINGERPRINT or key=value,... of its parameters",
        )
        for up in stage.upstream
    ]
    options += [_param_option(p) for p in stage.params]
    options += [_make_option(n, s, whole_dataset and n in PER_CLIP_OPTIONS) for n, s in EXECUTOR_OPTIONS.items()]
    options += list(stage.cli_options)

    def callback(**values):
        ctx = click.get_current_context()
        given = [n for n in REFUSED_FOR_WHOLE_DATASET if ctx.get_parameter_source(n) != ParameterSource.DEFAULT]
        if whole_dataset and given:
            raise click.UsageError(
                f"{stage.name} is one fit over the whole dataset: {', '.join('--' + _flag_name(n) for n in given)} does not apply"
            )
        try:
            code = invoke_stage(stage, values, lambda name: ctx.get_parameter_source(name) == ParameterSource.DEFAULT)
        except click.ClickException:
            raise
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise click.ClickException(str(e)) from None
        ctx.exit(code)

    return click.Command(stage.name, callback=callback, params=options, help=stage.help, short_help=stage.help.split(". ")[0])


def invoke_stage(stage: Stage, values: dict, is_default) -> int:
    """Run a stage command with parsed option ``values``; returns the exit code."""
    upstream_select = {up.stage: values[_upstream_dest(up.stage)] for up in stage.upstream if values[_upstream_dest(up.stage)]}
    params = {p.name: values[p.name] for p in stage.params}
    manifest, cache = values["manifest"], values["cache"]
    resources = {
        k: values[k] for k in EXECUTOR_OPTIONS if k not in ("executor", "shards", "wait", "dry_run") and values[k] is not None
    }

    if values["config"]:
        pipe = load_pipeline(values["config"])
        manifest = manifest or pipe.manifest
        cache = pipe.cache if is_default("cache") and pipe.cache else cache
        from_file = dict(pipe.stages.get(stage.name, {}))
        params.update({k: v for k, v in from_file.items() if is_default(k)})
        resources = {**pipe.resources.get(stage.name, {}), **resources}
        if values["shards"] is None and (values["executor"] == "slurm" or values["dry_run"]):
            values = {**values, "shards": pipe.shards.get(stage.name)}
        for up in stage.upstream:  # the file knows the upstream's parameters: select exactly
            if up.stage not in upstream_select and up.stage in pipe.stages:
                upstream_select[up.stage] = expected_fingerprint(up.stage, pipe.stages)
    if not manifest:
        raise click.UsageError("give --manifest (or --config with a manifest, or SOUNDSTAGE_MANIFEST)")
    # this process, its shard processes and its SLURM tasks digest inputs alike
    use_input_digest(values["input_digest"] or (pipe.input_digest if values["config"] else None))

    if values["executor"] == "slurm" or values["dry_run"]:
        cli_args = stage_cli_args(stage, params, manifest, cache, upstream_select, values)
        return launch_stage(
            stage,
            cli_args,
            manifest=manifest,
            cache=cache,
            params=params,
            upstream_select=upstream_select,
            executor=values["executor"],
            shards=values["shards"] or 1,
            wait=values["wait"],
            dry_run=values["dry_run"],
            resources=resources,
            force=values["force"],
            reuse_fit=values["reuse_fit"],
        )

    summary = run_local(
        stage,
        manifest,
        cache,
        params,
        upstream_select,
        shard=values["shard"],
        jobs=values["shards"] or values["jobs"],
        workers=values["workers"],
        batch_size=values["batch_size"],
        commit_every=values["commit_every"],
        progress=values["progress"],
        fingerprint=values["fingerprint"],
        task_plan=values["task_plan"],
        max_consecutive_errors=values["max_consecutive_errors"],
        force=values["force"],
        reuse_fit=values["reuse_fit"],
    )
    click.echo(summary.format())
    if values["allow_failed_clips"] and not summary.interrupted:
        return 0
    return summary.exit_code
