"""Evaluating a saved run (``soundstage evaluate --run runs/NAME``) on any split and audio variant.

The model is the run's ``model/best`` (the evaluation with the best ``--select`` metric) or
``model/last`` (``weights``; default best when there is one), or the weights of its last
checkpoint when the run has not finished; the cues are exactly the cache outputs recorded in
``provenance.json``.
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch

import soundstage.train.assemble as assemble
from soundstage.device import resolve_device
from soundstage.train.checkpoint import WeightsError, read_state_dict
from soundstage.train.config import ConfigError, TrainConfig, resolve_config
from soundstage.train.evaluation import DEFAULT_PROTOCOL, evaluate, protocols_for
from soundstage.train.recipes import get_recipe
from soundstage.train.run_dir import RunDir, read_json


def load_run(path: str) -> tuple[RunDir, TrainConfig, dict]:
    run = RunDir(path)
    saved = run.config()
    if saved is None:
        raise ConfigError(f"{path} is not a training run (no config.json)")
    recorded = read_json(run.file("provenance.json")) or {}
    cfg, cues = TrainConfig.from_dict(saved), recorded.get("cues", {})
    # a run folder moved or copied with its project (`cp -a project copy`): what it recorded by
    # absolute path is looked for at the same place relative to the run folder when it is gone
    for key in ("manifest", "cache", "pipeline"):
        setattr(cfg, key, relocated(getattr(cfg, key), saved.get("out"), run.path))
    for entry in cues.values():
        entry["path"] = relocated(entry.get("path"), saved.get("out"), run.path)
    cfg.out = run.path
    return run, cfg, cues


def relocated(path: str | None, recorded_run: str | None, run: str) -> str | None:
    """``path`` as recorded by the run then at ``recorded_run``; when it is gone and the run folder
    is now ``run``, the path at the same place relative to it, if that exists."""
    if not path or not recorded_run or os.path.exists(path) or os.path.abspath(recorded_run) == run:
        return path
    moved = os.path.normpath(os.path.join(run, os.path.relpath(path, recorded_run)))
    return moved if os.path.exists(moved) else path


def run_model(run: RunDir, cfg: TrainConfig, cues: dict, weights: str | None = None) -> tuple[object, str]:
    """(model, where its weights came from); ``weights``: best | last | None (best when there is one)."""
    recipe = get_recipe(cfg.recipe)
    path, what = run.weights(weights)
    if what != "checkpoint":
        return recipe.load(path), path
    model = recipe.build(cfg, cues)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return model, path


def evaluate_saved_run(
    path: str,
    split: str | None = None,
    audio: str = "real",
    protocol: str | None = None,
    device: str = "auto",
    log=print,
    weights: str | None = None,
    options: dict | None = None,
) -> dict:
    """``options``: the protocol's options (batch_size, frames_per_video, threshold, ...)."""
    run, cfg, recorded = load_run(path)
    split = split or cfg.eval_split
    cues = assemble.open_cues(cfg, recorded=recorded, log=log)
    model, source = run_model(run, cfg, cues, weights)
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
    result = evaluate(
        model,
        data,
        cfg.task,
        protocol,
        device=device,
        batch_size=cfg.eval_batch_size,
        predict=recipe.predict,
        options={protocol: options or {}},
    )
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
        "aggregation": result.get("aggregation"),
        "result": result,
    }


def evaluate_checkpoint(
    recipe_name: str,
    checkpoint: str,
    manifest: str | None = None,
    cache: str | None = None,
    pipeline_file: str | None = None,
    split: str = "test",
    model: str | None = None,
    probes: list | None = None,
    device: str = "auto",
    log=print,
) -> dict:
    """A checkpoint of a recipe's model — saved by the seed code (its key layout) or by us — scored
    through the caches on ``split``: every protocol for its task (the paper's first) with the real
    audio cue and each probe. Returns ``{"protocols": [...], "paper_protocol", "eval": {variant:
    {protocol: result}}, "weights", "split", "recipe"}``."""
    options = {"recipe": recipe_name, "manifest": manifest, "cache": cache, "model": model, "out": "."}
    if probes is not None:
        options["probes"] = probes
    cfg = resolve_config(pipeline_file, options)
    recipe = get_recipe(cfg.recipe)
    cues = assemble.open_cues(cfg, log=log)
    net = recipe.build(cfg, cues)
    try:
        state = read_state_dict(checkpoint, recipe)
    except WeightsError as e:
        raise ConfigError(f"--checkpoint {e}") from None
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(recipe.unused_keys)]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"--checkpoint {checkpoint} does not fit the {recipe.name} model "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(result.unexpected_keys)} unexpected, "
            f"e.g. {result.unexpected_keys[:1]}): another base model (--model) or another recipe?"
        )
    device = resolve_device(device)
    net.to(device)
    paper = cfg.protocol or DEFAULT_PROTOCOL[cfg.task]
    names = [paper, *(p for p in protocols_for(cfg.task) if p != paper)]
    clips = functools.partial(
        assemble.dataset, cfg, cues, split, num_queries=net.config.num_queries, active_encoding=recipe.active_encoding
    )
    scores = {}
    with tempfile.TemporaryDirectory(prefix="soundstage-eval-") as scratch:
        for variant in ["real", *cfg.probes]:
            silence = assemble.silence_for(RunDir(scratch), cues, assemble.max_frames(clips())) if variant == "muted" else None
            data = clips(variant, silence=silence)
            scores[variant] = evaluate(
                net, data, cfg.task, names, device=device, batch_size=cfg.eval_batch_size, predict=recipe.predict
            )
    return {
        "recipe": recipe.name,
        "weights": checkpoint,
        "split": split,
        "paper_protocol": paper,
        "protocols": names,
        "eval": scores,
    }


def checkpoint_table(result: dict) -> str:
    """One line per protocol, mIoU and F per audio variant (the paper's protocol first)."""
    variants = list(result["eval"])
    header = f"{'protocol':18s} " + " ".join(f"{v + ' mIoU':>14s} {v + ' F':>12s}" for v in variants)
    lines = [header, "-" * len(header)]
    for name in result["protocols"]:
        cells = []
        for v in variants:
            r = result["eval"][v][name]
            cells.append(f"{_number(r.get('miou')):>14s} {_number(r.get('fscore')):>12s}")
        mark = " (paper)" if name == result["paper_protocol"] else ""
        lines.append(f"{name + mark:18s} " + " ".join(cells))
    return "\n".join(lines)


def _number(value) -> str:
    return "—" if value is None else f"{value:.4f}"
