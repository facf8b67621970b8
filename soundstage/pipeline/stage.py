"""The stage declaration: what a stage is, as data.

A stage module builds one ``Stage`` and names it ``STAGE``. Everything else — selecting the
clips of a shard, skipping committed ones, prefetching, batching, committing parts, recording
failures, progress, locking, the CLI options — is the runner's and is written once.

Per-clip stage (the common case)::

    STAGE = Stage(
        name="audio-stats", version=1,
        params=[Param("silence_db", float, -60.0, "RMS below this (dB) counts as silent")],
        fields=[Field("rms_db", "float32", (None,)), Field("sample_rate", "int32", ())],
        load=load_clip,          # (row: dict, ctx: LoadContext) -> item       (worker process)
        process=compute,         # (model, items: list, params: dict) -> list[dict]  (main process);
                                 # default: the items as they are (all work done in load)
        setup=None,              # (params: dict) -> model, once per run (device is a param)
        batch_key=None,          # (item) -> hashable; only items with equal keys share a batch
    )

Whole-dataset stage (``kind="global"``, e.g. fitting k-means): ``fit(ctx: FitContext) ->
dict[str, np.ndarray]`` runs once and its arrays are stored in ``result.h5``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from soundstage.cache.schema import FIELD_DTYPES, Field  # noqa: F401 (declared with stages; stored by the cache)


@dataclass(frozen=True)
class Param:
    """One parameter of a stage; becomes the CLI option ``--<name with dashes>``.

    ``fingerprint=False`` marks parameters that do not change the output (batch size,
    device): they are options but stay out of the cache key. ``identity`` maps a value to
    what goes into the fingerprint instead of the value itself — e.g. a checkpoint path to
    the hash of its content, so the key survives moving the file. ``omit_default=True`` keeps
    the default value out of the key: for a parameter added to the key later, so outputs made
    before it (all with the default) keep their fingerprint.
    """

    name: str
    type: Any = str
    default: Any = None
    help: str = ""
    fingerprint: bool = True
    identity: Callable[[Any], Any] | None = None
    choices: Sequence[str] | None = None
    multiple: bool = False
    is_flag: bool = False
    omit_default: bool = False
    #: (all parameter values) -> whether this one matters; one that does not (k with imported
    #: centroids) is left out of the key and of what stage.json and status show
    applies: Callable[[dict], bool] | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Upstream:
    """A stage this one reads. ``alias`` is how ``load``/``fit`` see it (``ctx.upstream[alias]``)."""

    alias: str
    stage: str


@dataclass
class Stage:
    name: str
    version: int
    params: list[Param] = field(default_factory=list)
    fields: list[Field] = field(default_factory=list)
    upstream: list[Upstream] = field(default_factory=list)
    help: str = ""
    kind: str = "per_clip"  # or "global"
    # manifest columns without which no clip can be done (e.g. audio_path): a manifest lacking one
    # is refused as a whole, before any work, instead of failing every clip
    required_columns: Sequence[str] = ()
    # manifest columns ``load`` reads; with the files that ``*_path``/``*_dir`` columns name (size,
    # mtime) and the upstream clips, they make each clip's input digest: a clip whose digest
    # changed is recomputed. None (the default): every column, the safe choice for a new stage
    reads: Sequence[str] | None = None
    # per-clip stages
    load: Callable | None = None
    process: Callable | None = None
    setup: Callable | None = None
    batch_key: Callable | None = None
    # (item) -> True for an item that may exhaust memory (e.g. very long audio): the runner commits
    # what is finished, then runs it alone and marked, so that if the process dies in it the next
    # run records it as failed instead of dying again (soundstage.pipeline.attempts)
    risky: Callable | None = None
    default_batch_size: int = 8
    # (values of one clip) -> a short note worth counting in the summary, e.g. "2 frames
    # unparseable"; the clip is still done. For outcomes a user should see but that are data.
    warn: Callable | None = None
    # (model, params) -> dict of facts about the loaded model worth keeping with the output
    # (e.g. the class ids its columns stand for); stored in stage.json under "metadata"
    metadata: Callable | None = None
    # global stages
    fit: Callable | None = None
    # resources a scheduler should ask for by default (cpus, gpus, mem, time)
    resources: Mapping[str, Any] = field(default_factory=dict)
    # extra click options that act and exit (e.g. --print-prompt); not parameters
    cli_options: list = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in ("per_clip", "global"):
            raise ValueError(f"stage {self.name}: kind must be 'per_clip' or 'global'")
        if self.kind == "per_clip" and self.load is None:
            raise ValueError(f"stage {self.name}: a per-clip stage needs load")
        if self.kind == "per_clip" and self.process is None:
            self.process = items_as_results
        if self.kind == "global" and self.fit is None:
            raise ValueError(f"stage {self.name}: a global stage needs fit")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name}: duplicate parameter names {names}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"stage {self.name} has no parameter {name!r}")

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}


def items_as_results(model, items: list, params: dict) -> list:
    """The default ``process``: what ``load`` returned is what is stored."""
    return items


@dataclass
class LoadContext:
    """What ``load`` sees besides the manifest row (in a worker process)."""

    params: dict
    #: alias -> the chosen upstream output as ``open_stage`` gives it: a read-only mapping
    #: clip_id -> {field: value} (per-clip stages), or a dict of arrays (whole-dataset stages)
    upstream: dict
    #: directory of the manifest file, to resolve relative paths in it
    manifest_dir: str


@dataclass
class FitContext:
    """What a global stage's ``fit`` sees."""

    params: dict
    upstream: dict
    clip_ids: list
    rows: list  # manifest rows (dicts) of clip_ids, same order
    log: Callable[[str], None] = print
    progress: bool = False  # show a bar for long steps (--progress)


class ClipError(Exception):
    """Raised by ``load``/``process`` for a problem with one clip's input; recorded, run goes on."""
