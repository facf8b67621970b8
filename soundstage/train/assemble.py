"""Putting a run together from its settings: the cues it reads, its datasets, its model.

Shared by the training loop and by ``soundstage evaluate --run`` (which reopens exactly the cache
outputs the run recorded in ``provenance.json``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

from soundstage import __version__
from soundstage.cache.reader import StageReader
from soundstage.manifests.table import read_manifest
from soundstage.models.avs_mask2former import (
    AVSMask2Former,
    build_model,
    tiny_mask2former_spec,
)
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.train.checkpoint import WeightsError, read_state_dict
from soundstage.train.config import ConfigError, TrainConfig
from soundstage.train.cues import (
    CueError,
    active_cue,
    audio_cue,
    open_cue,
    pipeline_output,
    prior_cue,
    provenance,
    select_output,
    text_cue,
)
from soundstage.train.data import TASKS, AVSClips
from soundstage.train.probes import silence_cue
from soundstage.train.run_dir import RunDir, file_sha256, read_json

REAL_IMAGE_SIZE = 384  # the seed methods' Mask2Former input size


def cue_specs(cfg: TrainConfig) -> dict:
    specs = {}
    if cfg.audio:
        specs["audio"] = audio_cue(cfg.audio, cfg.audio_select)
    if cfg.active:
        specs["active"] = active_cue(cfg.active, cfg.active_select)
    if cfg.text_cues:
        specs["text"] = text_cue(cfg.text_select)
    if cfg.prior and "masks" in (cfg.prior_train, cfg.prior_eval):
        specs["prior"] = prior_cue(cfg.prior)
    return specs


def open_cues(cfg: TrainConfig, recorded: dict | None = None, log=print) -> dict:
    """role -> (CueSpec, StageReader). ``recorded``: a run's provenance (reopen those outputs);
    else a pipeline file selects by its parameters (for the stages it declares), the selector
    of each cue otherwise."""
    cues = {}
    for role, spec in cue_specs(cfg).items():
        stage_dir = None
        if recorded is not None:
            if role not in recorded:
                raise CueError(f"the run recorded no {role} cue")
            stage_dir = recorded[role]["path"]
            if not os.path.isdir(stage_dir):
                raise CueError(f"the {role} cache the run was trained on is gone: {stage_dir}")
        elif cfg.pipeline and spec.selector is None and _declares(cfg.pipeline, spec.stage):
            stage_dir = pipeline_output(cfg.pipeline, spec.stage).path
        cues[role] = (spec, open_cue(spec, cache=cfg.cache, stage_dir=stage_dir, log=log))
        if recorded is not None and cues[role][1].meta["fingerprint"] != recorded[role]["fingerprint"]:
            raise CueError(f"{stage_dir} is not the {role} cache the run was trained on")
    return cues


def _declares(pipeline_file: str, stage: str) -> bool:
    return stage in load_pipeline(pipeline_file).stages


def image_size(cfg: TrainConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    return tiny_mask2former_spec()["image_size"] if cfg.model is None else REAL_IMAGE_SIZE


def cue_width(cues: dict, role: str) -> int | None:
    if role not in cues:
        return None
    spec, reader = cues[role]
    first = next(iter(reader), None)
    if first is None:
        raise CueError(f"the {role} cache {reader.dir.path} holds no clips")
    return int(np.asarray(reader[first][spec.field]).shape[-1])


def new_model(cfg: TrainConfig, cues: dict) -> AVSMask2Former:
    weights = {k: getattr(cfg, k) for k in ("class_weight", "mask_weight", "dice_weight", "no_object_weight")}
    model = build_model(
        cfg.model,
        TASKS[cfg.task],
        cfg.conditioning,
        cue_width(cues, "audio"),
        text_dim=cue_width(cues, "text"),
        num_queries=cfg.num_queries,
        loss_weights=weights,
        seed=cfg.seed,
        prior=bool(cfg.prior),
    )
    if "audio" in cues:
        spec, reader = cues["audio"]
        rows = [np.asarray(reader[cid][spec.field], dtype=np.float32) for cid in train_clip_ids(cfg)]
        model.conditioner.set_audio_statistics(np.concatenate(rows))
    if cfg.freeze_backbone:
        for p in model.mask2former.model.pixel_level_module.encoder.parameters():
            p.requires_grad_(False)
    return model


def init_weights(model, recipe, path: str, log=print) -> None:
    """Start from ``path``: a run's ``model/`` folder or checkpoint, a state dict in our layout, or
    a checkpoint the seed code saved (its key layout, mapped by the recipe's ``key_map``). Every
    key must be used and every tensor must fit; weights the file lacks keep their initialisation
    and are listed."""
    try:
        state = read_state_dict(path, recipe)
    except WeightsError as e:
        raise ConfigError(f"--init-from {e}") from None
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        unexpected = result.unexpected_keys
        raise ConfigError(f"--init-from {path}: {len(unexpected)} key(s) the model does not have, e.g. {unexpected[0]}")
    if result.missing_keys:
        missing = result.missing_keys
        log(f"--init-from {path}: {len(missing)} tensor(s) not in the file keep their initialisation, e.g. {missing[0]}")


def train_clip_ids(cfg: TrainConfig) -> list[str]:
    df = read_manifest(cfg.manifest)
    ids = df[df["split"] == cfg.train_split]["clip_id"].tolist()
    if not ids:
        raise empty_split(cfg, cfg.train_split, df)
    return ids


def empty_split(cfg: TrainConfig, split: str, df=None) -> ConfigError:
    """The error for a split with no clips to train on, with the splits the manifest has."""
    df = read_manifest(cfg.manifest) if df is None else df
    has = ", ".join(f"{name} {count}" for name, count in df["split"].value_counts().sort_index().items()) or "no rows"
    return ConfigError(
        f"{cfg.manifest}: no clips to train on in split {split!r} (the manifest has: {has}); set train_split in the pipeline file's train: section, or fix the manifest"
    )


def silence_for(run: RunDir, cues: dict, seconds: int, device: str = "cpu") -> np.ndarray:
    """The muted cue (digital silence through the audio cue's own model), kept in the run dir."""
    spec, reader = cues["audio"]
    meta = reader.meta
    path = run.file("silence", f"{meta['stage']}-{meta['fingerprint']}-{spec.field}-{seconds}s.npy")
    if os.path.exists(path):
        return np.load(path)
    values = silence_cue(reader.dir.path, spec.field, seconds, device=device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path + ".tmp.npy", values)
    os.replace(path + ".tmp.npy", path)
    return values


def dataset(
    cfg: TrainConfig,
    cues: dict,
    split: str,
    variant: str = "real",
    silence=None,
    num_queries: int | None = None,
    training: bool = False,
    active_encoding=None,
) -> AVSClips:
    """The clips of ``split``; ``training``: with the training frames' mask prior (``prior_train``)
    rather than the evaluated frames' (``prior_eval``)."""
    prior = (cfg.prior_train if training else cfg.prior_eval) if cfg.prior else None
    data = AVSClips(
        cfg.manifest,
        split,
        cues,
        image_size(cfg),
        cfg.mask_size,
        task=cfg.task,
        unlabelled=cfg.unlabelled,
        audio_variant=variant,
        silence=silence,
        num_queries=num_queries,
        prior=prior,
        active_encoding=active_encoding,
    )
    if training and len(data) == 0:
        raise empty_split(cfg, split)
    reader = frames_reader(cfg)
    if reader is not None:
        data.use_frames(reader, required=cfg.frames == "cache")
    return data


def frames_reader(cfg: TrainConfig) -> StageReader | None:
    """The ``frames`` output at the model's input size (``frames: auto`` or ``cache``), if any:
    images are then read from it rather than decoded per item (the same tensors)."""
    if cfg.frames == "decode" or not cfg.cache:
        return None
    try:
        stage_dir = select_output(cfg.cache, "frames", {"size": image_size(cfg)}, log=lambda _: None)
    except CueError as e:
        if cfg.frames == "cache":
            raise CueError(f"frames: cache: {e}") from None
        return None
    return StageReader(stage_dir.path, fields=["pixels"])


def frames_provenance(cfg: TrainConfig) -> dict:
    reader = frames_reader(cfg)
    return {"read_from": "decoded"} if reader is None else {"read_from": "frames", **provenance(reader)}


def max_frames(data: AVSClips) -> int:
    return max(int(r["num_frames"]) for r in data.rows)


def check_same_data(run: RunDir, cfg: TrainConfig, cues: dict) -> None:
    """A run resumes only on the data it was trained on: the manifest's content (sha256) and each
    cue's cache output (fingerprint) as ``provenance.json`` recorded them, wherever they lie now."""
    recorded = read_json(run.file("provenance.json"))
    if not recorded:
        return
    changed = []
    manifest = recorded.get("manifest", {})
    if manifest.get("sha256") and manifest["sha256"] != file_sha256(cfg.manifest):
        changed.append(f"the manifest {cfg.manifest} differs from the one it was trained on ({manifest.get('path')})")
    for role, (_, reader) in cues.items():
        was = recorded.get("cues", {}).get(role, {}).get("fingerprint")
        if was and was != reader.meta["fingerprint"]:
            changed.append(f"its {role} cue is now {reader.meta['stage']} {reader.meta['fingerprint']}, it was trained on {was}")
    if changed:
        raise ConfigError(f"{run.path} cannot resume on other data: {'; '.join(changed)}; choose another --out")


def run_provenance(cfg: TrainConfig, cues: dict) -> dict:
    return {
        "cues": {role: {**spec.to_dict(), **provenance(reader)} for role, (spec, reader) in cues.items()},
        "frames": frames_provenance(cfg),
        "manifest": {"path": cfg.manifest, "sha256": file_sha256(cfg.manifest)},
        "model": cfg.model or "tiny (soundstage/data/tiny/mask2former.json)",
        "versions": {"soundstage": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
