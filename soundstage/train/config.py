"""The settings of one training run, and where they come from.

Precedence: command-line options over the pipeline file's ``train:`` section over the defaults
below. The resolved settings are written to the run directory as ``config.json``; resuming a
run requires the same settings (a different run needs a different ``--out``). Keys of the
``train:`` section are the field names below (dashes or underscores)::

    train:
      audio: vggish            # vggish | beats | beats-probs | units | STAGE:FIELD | none
      conditioning: add        # add | cosine | none
      task: binary             # binary | semantic
      epochs: 20
      batch_size: 2            # clips per micro-batch (every frame of a clip is one image)
      lr: 1.0e-4
      prior: masks             # Stepping Stones' mask prior from the masks stage (masks=SELECTOR picks one)

Mask prior (``prior``): the model takes a per-frame foreground probability as a spatial prior
(``soundstage.models.avs_mask2former``); ``prior_train`` says where the training frames' prior
comes from and ``prior_eval`` the evaluated frames' — ``gt`` (the ground-truth mask) or ``masks``
(the cached stage-1 masks); defaults ``gt`` and ``masks``, as Stepping Stones trains and tests.

Frames (``frames``): ``auto`` (default) reads each image from the ``frames`` stage's output at the
model's input size when the cache holds one with every clip of the split, else decodes the JPEG
per item; ``cache`` requires that output (an error otherwise); ``decode`` always decodes. Both
give the same tensors, so the setting is not part of what resuming compares.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from soundstage.models.avs_mask2former import MODES
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.train.data import TASKS, UNLABELLED_POLICIES, parse_variant
from soundstage.train.recipes import RecipeError, get_recipe

SCHEDULES = ("cosine", "poly", "constant")
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")  # fp64: for checking that two runs are the same training
PRIOR_SOURCES = ("gt", "masks")
FRAME_SOURCES = ("auto", "cache", "decode")
TRACKERS = ("tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    out: str = "runs/run"
    manifest: str | None = None
    cache: str | None = None
    pipeline: str | None = None  # the pipeline file the settings came from, if any
    # the method (soundstage.train.recipes): its settings are the defaults of the fields below
    recipe: str = "generic"
    recipe_options: dict = field(default_factory=dict)  # the recipe's own options, resolved
    init_from: str | None = None  # weights to start from: a run's model/ or checkpoint, or the seed code's checkpoint
    # model
    model: str | None = None  # transformers Mask2Former hub id or folder; None: the shipped tiny config
    task: str = "binary"
    conditioning: str = "add"
    num_queries: int | None = None  # None: the model's
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    freeze_backbone: bool = False
    # cues
    audio: str | None = "vggish"
    audio_select: str | None = None  # which output of the audio stage (fingerprint or key=value,...)
    active: str | None = None  # active queries: units | STAGE:FIELD
    active_select: str | None = None
    text_cues: bool = False
    text_select: str | None = None
    prior: str | None = None  # "masks" or "masks=SELECTOR": Stepping Stones' mask prior; None: none
    prior_train: str | None = None  # gt | masks (with a prior; default gt)
    prior_eval: str | None = None  # masks | gt (with a prior; default masks)
    # data
    train_split: str = "train"
    eval_split: str = "val"
    image_size: int | None = None  # None: 384 for a real model, the tiny config's for the tiny one
    mask_size: int | None = None  # None: image_size
    unlabelled: str = "first"  # first | repeat (frames without annotation, e.g. v1s train)
    frames: str = "auto"  # auto | cache | decode: images from the frames stage's output at image_size, or decoded
    workers: int = 0
    # optimisation
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    batch_size: int = 2
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    poly_power: float = 0.9
    clip_grad: float | None = 1.0
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None  # CPU threads of torch (None: torch's default); 1 is fastest for tiny models on a busy machine
    seed: int = 0
    deterministic: bool = True
    # processes of the run (DDP; set by the run itself, not an option): one optimizer step sees
    # batch_size x accumulate x world_size clips, so resuming needs the same count
    world_size: int = 1
    # the Mask2Former loss made independent of how a batch is split over processes (normalisers
    # summed over ranks, sample points drawn per frame; soundstage.train.distributed). None: on
    # with several processes; true on one process gives the exact reference of a DDP run
    split_invariant_loss: bool | None = None
    # bookkeeping
    checkpoint_every: int = 50  # optimizer steps (and at every epoch end)
    eval_every: int = 1  # epochs
    log_every: int = 1  # steps
    protocol: str | None = None  # None: avsbench-binary / avsbench-semantic by task
    probes: list = field(default_factory=lambda: ["muted", "zeroed", "swapped", "noise:10"])
    eval_batch_size: int = 4
    # model/best: the evaluation metric it is chosen by (None: the headline protocol's mIoU with
    # the real audio, e.g. val/avsbench-binary/miou; names: soundstage.train.run_dir)
    select: str | None = None
    tracker: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow (soundstage.train.tracking)

    def validate(self) -> TrainConfig:
        choices = {
            "task": TASKS,
            "conditioning": MODES,
            "schedule": SCHEDULES,
            "precision": PRECISIONS,
            "unlabelled": UNLABELLED_POLICIES,
            "frames": FRAME_SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.manifest:
            raise ConfigError("no manifest: give --manifest or --config PIPELINE.yaml")
        if not self.cache and (self.audio or self.active or self.text_cues):
            raise ConfigError("no cache: give --cache or --config PIPELINE.yaml")
        if self.conditioning != "none" and not self.audio:
            raise ConfigError(f"conditioning {self.conditioning!r} needs an audio cue (--audio), or use --conditioning none")
        for name in ("epochs", "batch_size", "accumulate", "checkpoint_every", "eval_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for probe in self.probes:
            try:
                parse_variant(probe)
            except ValueError as e:
                raise ConfigError(f"probes: {e}") from None
        if self.probes and not self.audio:
            self.probes = []
        if isinstance(self.tracker, str):
            self.tracker = [t.strip() for t in self.tracker.split(",") if t.strip()]
        self.tracker = [] if self.tracker == ["none"] else list(dict.fromkeys(self.tracker))
        for name in self.tracker:
            if name not in TRACKERS:
                raise ConfigError(f"tracker {name!r}: use {', '.join(TRACKERS)} or none")
        self._validate_prior()
        return self

    def _validate_prior(self) -> None:
        if not self.prior:
            if self.prior_train or self.prior_eval:
                raise ConfigError("prior_train/prior_eval need a prior (--prior masks)")
            return
        if self.prior != "masks" and not self.prior.startswith("masks="):
            raise ConfigError(f"prior: {self.prior!r}; use masks (the masks stage's output) or masks=SELECTOR")
        self.prior_train, self.prior_eval = self.prior_train or "gt", self.prior_eval or "masks"
        for name in ("prior_train", "prior_eval"):
            if getattr(self, name) not in PRIOR_SOURCES:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(PRIOR_SOURCES)}")
        if not self.cache and "masks" in (self.prior_train, self.prior_eval):
            raise ConfigError("no cache for the masks prior: give --cache or --config PIPELINE.yaml")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def resolve_config(pipeline_file: str | None, options: dict) -> TrainConfig:
    """Defaults <- the pipeline file's ``train:`` section (and its manifest/cache) <- ``options``
    (None values are "not given"); the recipe's settings (``soundstage.train.recipes``) sit above
    the defaults, and above a ``train:`` section that does not name that recipe itself (one
    written for the generic model)."""
    values: dict = {}
    section: dict = {}
    if pipeline_file:
        pipe = load_pipeline(pipeline_file)
        values.update(manifest=pipe.manifest, cache=pipe.cache, pipeline=pipe.path)
        section = {k.replace("-", "_"): v for k, v in (pipe.train or {}).items()}
        section.pop("step", None)  # how `soundstage run` submits the training (soundstage.train.slurm_job)
        base = os.path.dirname(pipe.path)
        if isinstance(section.get("model"), str) and os.path.exists(os.path.join(base, section["model"])):
            section["model"] = os.path.join(base, section["model"])  # a folder next to the file
    given = {k: v for k, v in options.items() if v is not None}
    values.update(with_recipe_settings(section, given))
    for key in ("manifest", "cache", "out", "init_from"):
        if values.get(key):
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    for key in ("audio", "active", "prior"):
        if isinstance(values.get(key), str) and values[key].lower() == "none":
            values[key] = None
    return TrainConfig.from_dict(values).validate()


def with_recipe_settings(section: dict, given: dict) -> dict:
    """The settings from a pipeline file's ``train:`` section, the recipe's and the command line's
    (``given``), in that order of precedence (see ``resolve_config``), options resolved."""
    name = given.get("recipe") or section.get("recipe")
    try:
        recipe = get_recipe(name)
        options = recipe.resolved_options({**section.get("recipe_options", {}), **given.get("recipe_options", {})})
    except RecipeError as e:
        raise ConfigError(str(e)) from None
    paper = {"protocol": recipe.protocol} if recipe.protocol else {}
    if section.get("recipe") == recipe.name:
        merged = {**paper, **recipe.settings, **section, **given}
    else:
        merged = {**section, **paper, **recipe.settings, **given}
    return {**merged, "recipe": recipe.name, "recipe_options": options}


def same_settings(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a saved run and this invocation (what resuming forbids).
    A setting a saved run predates counts as its default."""
    ignored = {"workers", "device", "checkpoint_every", "log_every", "frames", "tracker"}  # do not change the result
    # where the run folder, the pipeline file, the manifest and the cache are: a moved or copied run
    # resumes; the manifest's and the cues' content are checked instead (assemble.check_same_data)
    ignored |= {"out", "pipeline", "manifest", "cache"}
    saved = {**TrainConfig().to_dict(), **saved}
    keys = (set(saved) | set(current)) - ignored
    return sorted(k for k in keys if json.dumps(saved.get(k)) != json.dumps(current.get(k)))
