"""Evaluating a saved run (``soundstage evaluate --run runs/NAME``) on any split and audio variant.

The model is the run's final ``model/`` folder, or the weights of its last checkpoint when the
run has not finished; the cues are exactly the cache outputs recorded in ``provenance.json``.
"""

from __future__ import annotations

import functools
import os

import torch

import soundstage.train.assemble as assemble
from soundstage.device import resolve_device
from soundstage.train.config import ConfigError, TrainConfig
from soundstage.train.evaluation import DEFAULT_PROTOCOL, evaluate
from soundstage.train.recipes import get_recipe
from soundstage.train.run_dir import RunDir, read_json


def load_run(path: str) -> tuple[RunDir, TrainConfig, dict]:
    run = RunDir(path)
    saved = run.config()
    if saved is None:
        raise ConfigError(f"{path} is not a training run (no config.json)")
    recorded = read_json(run.file("provenance.json")) or {}
    return run, TrainConfig.from_dict(saved), recorded.get("cues", {})


def run_model(run: RunDir, cfg: TrainConfig, cues: dict) -> tuple[object, str]:
    """(model, where its weights came from)."""
    recipe = get_recipe(cfg.recipe)
    if os.path.isdir(run.model_dir):
        return recipe.load(run.model_dir), run.model_dir
    if not os.path.exists(run.checkpoint):
        raise ConfigError(f"{run.path} has neither a final model nor a checkpoint yet")
    model = recipe.build(cfg, cues)
    model.load_state_dict(torch.load(run.checkpoint, map_location="cpu", weights_only=True)["model"])
    return model, run.checkpoint


def evaluate_saved_run(
    path: str, split: str | None = None, audio: str = "real", protocol: str | None = None, device: str = "auto", log=print
) -> dict:
    run, cfg, recorded = load_run(path)
    split = split or cfg.eval_split
    cues = assemble.open_cues(cfg, recorded=recorded, log=log)
    model, source = run_model(run, cfg, cues)
    device = resolve_device(device)
    model.to(device)
    recipe = get_recipe(cfg.recipe)
    clips = functools.partial(
        assemble.dataset, cfg, cues, split, num_queries=model.config.num_queries, active_encoding=recipe.active_encoding
    )
    silence = None
    if audio == "muted":
        if "audio" not in cues:
            raise ConfigError("the run has no audio cue to mute")
        silence = assemble.silence_for(run, cues, assemble.max_frames(clips()))
    data = clips(audio, silence=silence)
    protocol = protocol or cfg.protocol or DEFAULT_PROTOCOL[cfg.task]
    result = evaluate(model, data, cfg.task, protocol, device=device, batch_size=cfg.eval_batch_size, predict=recipe.predict)
    return {
        "miou": result.get("miou"),
        "fscore": result.get("fscore"),
        "protocol": protocol,
        "split": split,
        "audio": audio,
        "clips": result["clips"],
        "frames": result["frames"],
        "run": run.path,
        "weights": source,
        "result": result,
    }
