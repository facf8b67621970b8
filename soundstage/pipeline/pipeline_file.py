"""The pipeline file: one experiment's manifest, cache, and per-stage parameters and resources.

::

    manifest: data/synth/manifest.csv   # relative paths resolve against this file's folder
    cache: cache
    executor: local                     # default for `soundstage run` (local | slurm)
    shards: 4                           # default shard count of every per-clip stage
    resources: {time: "01:00:00"}       # default SLURM resources of every stage
    stages:
      audio-stats:
        silence_db: -60                 # stage parameters (dashes or underscores)
      hubert:
        model: models/tiny-hubert       # a file or folder next to this file: resolved here too
        layer: 6
        shards: 8                       # this stage's own shard count
        resources: {gpus: 1, cpus: 4, mem: 16G}

``soundstage run FILE [STAGE ...]`` runs the named stages (default: all in the file) and the
upstream stages they need, in dependency order, skipping outputs the cache already holds. A
stage command given ``--config FILE`` takes its manifest, cache and parameters from the file,
command-line options overriding them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import click
import yaml

from soundstage.cache.digest import INPUT_DIGEST_MODES
from soundstage.pipeline.executors import run_pipeline
from soundstage.pipeline.fingerprint import coerce_value
from soundstage.pipeline.registry import STAGE_MODULES, get_stage
from soundstage.pipeline.resolve import expected_fingerprint

TOP_LEVEL_KEYS = {"manifest", "cache", "executor", "shards", "resources", "stages", "train", "input_digest"}
#: keys of a stage entry that are not stage parameters
STAGE_KEYS = {"resources", "shards"}


class PipelineError(ValueError):
    pass


@dataclass
class Pipeline:
    path: str
    manifest: str | None
    cache: str | None
    #: stage name -> parameters given in the file (names with underscores, local paths absolute)
    stages: dict
    #: stage name -> SLURM resources (the file's defaults merged in; every known stage has an entry)
    resources: dict
    #: stage name -> shard count (every known stage has an entry; None: not set)
    shards: dict
    executor: str | None = None
    input_digest: str | None = None  # stat or content (soundstage.cache.digest); None: $SOUNDSTAGE_INPUT_DIGEST
    declared: list = field(default_factory=list)  # stage names in file order
    #: the ``train:`` section as written (read by ``soundstage train --config``, not by the engine)
    train: dict = field(default_factory=dict)

    def order(self, targets: list[str] | None = None) -> list[str]:
        """``targets`` (default: the file's stages) and their upstream stages, upstream first."""
        return dependency_order(targets or self.declared)

    def upstream_select(self, stage_name: str) -> dict:
        """Upstream stage name -> the exact fingerprint these parameters give it."""
        return {up.stage: expected_fingerprint(up.stage, self.stages) for up in get_stage(stage_name).upstream}


def dependency_order(targets: list[str]) -> list[str]:
    """Stages ``targets`` need (transitively) and themselves, each after its upstream stages."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str):
        if name in order:
            return
        if name in visiting:
            raise PipelineError("stage dependencies form a cycle: " + " -> ".join(visiting + [name]))
        visiting.append(name)
        for up in get_stage(name).upstream:
            visit(up.stage)
        visiting.pop()
        order.append(name)

    for name in targets:
        if name not in STAGE_MODULES:
            raise PipelineError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}")
        visit(name)
    return order


def _resolve(base: str, path):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _local_path(base: str, value):
    """A relative path that exists next to the file, made absolute; any other value as given
    (a hub id such as ``facebook/hubert-base-ls960``, a name, a number)."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value:
        return value
    local = os.path.join(base, os.path.expanduser(value))
    return os.path.normpath(local) if os.path.exists(local) else value


def _stage_params(name: str, entry: dict, base: str) -> dict:
    stage = get_stage(name)
    params = {}
    for key, value in entry.items():
        key = key.replace("-", "_")
        try:
            param = stage.param(key)
        except KeyError:
            known = ", ".join(p.name for p in stage.params) or "none"
            raise PipelineError(f"stage {name}: no parameter {key!r} (parameters: {known})") from None
        if value is not None and param.type in (int, float) and not param.multiple:  # named here, with the file
            value = coerce_value(param.type, value, f"stage {name}: parameter {key}")
        params[key] = _local_path(base, value) if param.type is str and not param.choices else value
    return params


def load_pipeline(path: str) -> Pipeline:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PipelineError(f"{path}:{where}: not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected a mapping with manifest, cache and stages")
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(TOP_LEVEL_KEYS))}")
    base = os.path.dirname(os.path.abspath(path))
    executor = doc.get("executor")
    if executor not in (None, "local", "slurm"):
        raise PipelineError(f"{path}: executor must be local or slurm, not {executor!r}")
    if doc.get("input_digest") not in (None, *INPUT_DIGEST_MODES):
        raise PipelineError(f"{path}: input_digest must be one of {', '.join(INPUT_DIGEST_MODES)}, not {doc['input_digest']!r}")

    stages, resources, shards, declared = {}, {}, {}, []
    for name, entry in (doc.get("stages") or {}).items():
        if name not in STAGE_MODULES:
            raise PipelineError(f"{path}: unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}")
        if not isinstance(entry, (dict, type(None))):
            raise PipelineError(f"{path}: stage {name}: expected a mapping of parameters, got {entry!r}")
        entry = dict(entry or {})
        resources[name] = {**(doc.get("resources") or {}), **(entry.pop("resources", None) or {})}
        shards[name] = entry.pop("shards", doc.get("shards"))
        try:
            stages[name] = _stage_params(name, entry, base)
        except ValueError as e:
            raise PipelineError(f"{path}: {e}") from None
        declared.append(name)
    for name in STAGE_MODULES:  # stages the file does not name still get the file's defaults
        resources.setdefault(name, dict(doc.get("resources") or {}))
        shards.setdefault(name, doc.get("shards"))
    return Pipeline(
        path=os.path.abspath(path),
        manifest=_resolve(base, doc.get("manifest")),
        cache=_resolve(base, doc.get("cache")),
        stages=stages,
        resources=resources,
        shards=shards,
        executor=executor,
        input_digest=doc.get("input_digest"),
        declared=declared,
        train=_train_section(path, doc.get("train")),
    )


def _train_section(path: str, section) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise PipelineError(f"{path}: train: must be a mapping of training settings")
    return dict(section)


@click.command("run")
@click.argument("pipeline_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("stage_names", nargs=-1, metavar="[STAGE]...")
@click.option("--executor", type=click.Choice(["local", "slurm"]), help="where shards run (default: the file's, else local)")
@click.option("--shards", type=click.IntRange(min=1), help="shards of every per-clip stage (overrides the file)")
@click.option(
    "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="local: run this many shards in parallel processes"
)
@click.option("--workers", type=click.IntRange(min=0), help="decoding worker processes per shard")
@click.option("--wait", is_flag=True, help="slurm: block until the jobs finish, then print the summary")
@click.option("--dry-run", is_flag=True, help="print what would run (the sbatch scripts for slurm) without running it")
def run(pipeline_file, stage_names, executor, shards, jobs, workers, wait, dry_run):
    """Run the stages of PIPELINE_FILE (or only STAGE... and what they need), skipping cached outputs."""
    try:
        pipe = load_pipeline(pipeline_file)
        code = run_pipeline(
            pipe,
            list(stage_names) or None,
            executor=executor or pipe.executor or "local",
            shards=shards,
            jobs=jobs,
            workers=workers,
            wait=wait,
            dry_run=dry_run,
        )
    except (ValueError, RuntimeError, OSError, KeyError) as e:  # PipelineError and ManifestError are ValueErrors
        raise click.ClickException(str(e)) from None
    click.get_current_context().exit(code)
