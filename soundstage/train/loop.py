"""The training loop. Read it top to bottom: data and checkpoint details live in their modules.

``train(cfg)`` trains (or resumes) the run in ``cfg.out`` and returns its last evaluation.
Exit codes of the command: 0 finished, ``STOPPED`` (75) stopped by SIGTERM/SIGUSR1 after writing
a checkpoint: rerun the same command to continue.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time

import numpy as np
import torch
from tqdm import tqdm

from soundstage.models.device import resolve_device
from soundstage.train import assemble
from soundstage.train.checkpoint import (
    EpochSampler,
    StopSignals,
    load_checkpoint,
    save_checkpoint,
)
from soundstage.train.config import ConfigError, TrainConfig, same_settings
from soundstage.train.data import collate_frames
from soundstage.train.evaluation import evaluate, model_inputs
from soundstage.train.run_dir import RunDir, plot_curves

STOPPED = 75  # EX_TEMPFAIL: checkpointed on a signal, rerun to resume


class Stopped(Exception):
    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint saved — rerun the same command to resume")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float, power: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine or polynomial decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else (1 - progress) ** power
    return min_ratio + (1 - min_ratio) * decay


def autocast_for(precision: str, device: str):
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=torch.device(device).type, dtype=dtype)


def train(cfg: TrainConfig, log=print, progress: bool = True) -> dict:
    with torch_settings(cfg):
        return _train(cfg, log, progress)


@contextlib.contextmanager
def torch_settings(cfg: TrainConfig):
    """Deterministic algorithms and the thread count for the run; the caller's come back after."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, log, progress: bool) -> dict:
    run = RunDir(cfg.out)
    saved = run.config()
    if saved is not None and same_settings(saved, cfg.to_dict()):
        raise ConfigError(
            f"{run.path} holds a run with other settings ({', '.join(same_settings(saved, cfg.to_dict()))}); "
            "resume it with the same settings or choose another --out"
        )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    # -------------------------------------------------------------------- data
    cues = assemble.open_cues(cfg, log=log)
    model = assemble.new_model(cfg, cues).to(device)
    num_queries = model.config.num_queries
    train_set = assemble.dataset(cfg, cues, cfg.train_split, num_queries=num_queries, training=True)
    sampler = EpochSampler(len(train_set), cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_frames,
        num_workers=cfg.workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / cfg.batch_size) / cfg.accumulate)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)

    # -------------------------------------------------------------------- optimisation
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor,
            warmup=cfg.warmup_steps,
            total=total_steps,
            schedule=cfg.schedule,
            min_ratio=cfg.min_lr_ratio,
            power=cfg.poly_power,
        ),
    )
    scaler = torch.amp.GradScaler(torch.device(device).type) if cfg.precision == "fp16" else None
    autocast = autocast_for(cfg.precision, device)

    # -------------------------------------------------------------------- start or resume
    step, epoch, position = 0, 0, 0
    if saved is not None and run.done:
        log(f"{run.path}: the run is complete (rerun evaluations with `soundstage evaluate --run {run.path}`)")
        return (run.records("epochs.jsonl") or [{}])[-1]
    if saved is not None and _exists(run.checkpoint):
        state = load_checkpoint(run.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        run.keep_records("steps.jsonl", lambda r: r["step"] <= step)
        run.keep_records("epochs.jsonl", lambda r: r["epoch"] <= epoch)
        log(f"resuming {run.path} at step {step} (epoch {epoch}, {position} clips into it)")
    else:
        run.write_json("config.json", cfg.to_dict())
        run.write_json("provenance.json", assemble.run_provenance(cfg, cues))
        for name in ("steps.jsonl", "epochs.jsonl"):
            run.keep_records(name, lambda r: False)

    def checkpoint():
        save_checkpoint(
            run.checkpoint,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            epoch=epoch,
            position=position,
        )

    # -------------------------------------------------------------------- the loop
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    last_eval = {}
    with StopSignals() as signals:
        while epoch < cfg.epochs and step < total_steps:
            sampler.set_epoch(epoch, position)
            batches = iter(loader)
            while step < total_steps:
                micro_batches = [b for _, b in zip(range(cfg.accumulate), batches)]
                if not micro_batches:
                    break
                started = time.perf_counter()
                parts: dict[str, float] = {}
                for batch in micro_batches:
                    mask_labels, class_labels = targets(batch["labels"], device)
                    with autocast() if autocast else contextlib.nullcontext():
                        outputs = model(**model_inputs(batch, device), mask_labels=mask_labels, class_labels=class_labels)
                    loss = outputs.loss / len(micro_batches)
                    (scaler.scale(loss) if scaler else loss).backward()
                    parts["loss"] = parts.get("loss", 0.0) + loss.item()
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.clip_grad:
                    parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                position += sum(len(b["clip_ids"]) for b in micro_batches)

                seconds = time.perf_counter() - started
                if step % cfg.log_every == 0:
                    run.append(
                        "steps.jsonl",
                        {
                            "step": step,
                            "epoch": epoch,
                            **parts,
                            "lr": scheduler.get_last_lr()[0],
                            "step_seconds": round(seconds, 4),
                        },
                    )
                bar.set_postfix(loss=f"{parts['loss']:.4f}", step_s=f"{seconds:.2f}", epoch=epoch)
                bar.update(1)
                if step % cfg.checkpoint_every == 0 or signals.received:
                    checkpoint()
                if signals.received:
                    bar.close()
                    raise Stopped(signals.received, step)
            if position >= len(train_set) or step >= total_steps:
                epoch, position = epoch + 1, 0
                if epoch % cfg.eval_every == 0 or step >= total_steps:
                    last_eval = evaluate_run(cfg, run, model, cues, epoch, step, device, autocast, num_queries, log)
                checkpoint()
    bar.close()

    model.save_pretrained(run.model_dir)
    run.write_json("DONE", {"step": step, "epoch": epoch})
    return last_eval


def targets(labels: torch.Tensor, device) -> tuple[list, list]:
    """Mask2Former's targets per frame: one binary mask per class present, and the class ids."""
    mask_labels, class_labels = [], []
    for frame in labels:
        classes = torch.unique(frame)
        mask_labels.append((frame[None] == classes[:, None, None]).float().to(device))
        class_labels.append(classes.to(device))
    return mask_labels, class_labels


def evaluate_run(cfg, run: RunDir, model, cues, epoch: int, step: int, device, autocast, num_queries, log) -> dict:
    """Every audio variant on the evaluation split; one line of epochs.jsonl and the curves."""
    results = {}
    for variant in ["real", *cfg.probes]:
        silence = None
        if variant == "muted":
            probe_set = assemble.dataset(cfg, cues, cfg.eval_split, num_queries=num_queries)
            silence = assemble.silence_for(run, cues, assemble.max_frames(probe_set))
        data = assemble.dataset(cfg, cues, cfg.eval_split, variant, silence=silence, num_queries=num_queries)
        results[variant] = evaluate(
            model,
            data,
            cfg.task,
            cfg.protocol,
            device=device,
            autocast=autocast,
            batch_size=cfg.eval_batch_size,
            workers=cfg.workers,
        )
    record = {"epoch": epoch, "step": step, "split": cfg.eval_split, "eval": results}
    steps = [r["loss"] for r in run.records("steps.jsonl") if r["epoch"] == epoch - 1]
    record["train_loss"] = float(np.mean(steps)) if steps else None
    if "muted" in results:
        record["gap_real_muted"] = {k: _gap(results["real"].get(k), results["muted"].get(k)) for k in ("miou", "fscore")}
    run.append("epochs.jsonl", record)
    plot_curves(run)
    shown = "  ".join(f"{v} mIoU {r.get('miou', float('nan')):.4f}" for v, r in results.items())
    log(f"epoch {epoch} ({cfg.eval_split}): {shown}")
    return record


def _gap(a, b):
    return None if a is None or b is None else a - b


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
