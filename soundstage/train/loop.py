"""The training loop. Read it top to bottom: data and checkpoint details live in their modules.

``train(cfg)`` trains (or resumes) the run in ``cfg.out`` and returns its last evaluation.
Exit codes of the command: 0 finished, ``STOPPED`` (75) stopped by SIGTERM/SIGUSR1 after writing
a checkpoint: rerun the same command to continue.

On several processes (DDP, ``soundstage.train.distributed``) every rank runs this loop on its
share of each global batch; only rank 0 logs, tracks, writes metrics, curves, checkpoints and the
models, and a signal received by any rank stops all of them at the same step.

Each evaluation also goes to the trackers (``soundstage.train.tracking``) and keeps ``model/best``
when the ``select`` metric beats the best so far; the end of the run saves ``model/last``. A
recipe's ``loss`` returns the loss, or a dict of it (``"loss"``) and its parts, which add up to it
(``steps.jsonl`` and the trackers show each as ``loss_<part>``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
import time

import numpy as np
import torch

import soundstage.train.assemble as assemble
from soundstage.device import resolve_device
from soundstage.pipeline.lifeline import leave_stops_to_the_parent
from soundstage.pipeline.progress import progress_bar
from soundstage.train.checkpoint import (
    EpochSampler,
    StopSignals,
    has_checkpoint,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from soundstage.train.config import ConfigError, TrainConfig, same_settings
from soundstage.train.data import collate_frames
from soundstage.train.distributed import Distributed, SplitInvariantLoss
from soundstage.train.evaluation import evaluate, metric_names, run_protocols, selected_metric, with_protocols
from soundstage.train.metric_names import metric_values
from soundstage.train.recipes import get_recipe
from soundstage.train.run_dir import RunDir, plot_curves
from soundstage.train.tracking import Tracking, shown_frames

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


def train(cfg: TrainConfig, log=print, progress: bool = True, dist: Distributed | None = None) -> dict:
    """``dist``: this process's place in a DDP run (default: read from the environment, as
    ``torchrun`` sets it); only rank 0 logs and shows progress."""
    dist = dist or Distributed.from_env()
    if not dist.main:
        log, progress = _quiet, False
    with torch_settings(cfg), RunDir(cfg.out).trainer(hold=dist.main):
        try:
            return _train(cfg, log, progress, dist)
        finally:
            dist.stop()


def _quiet(*args, **kwargs) -> None:
    pass


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def hold_stop_signals() -> None:
    """Keep SIGTERM/SIGUSR1 pending (blocked) until the training loop takes them: the command
    calls this first, so a stop signal during start-up (imports, caches, model) or after the loop
    (final evaluation, saving) neither kills the process nor is lost before the loop."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, name) for name in STOP_SIGNALS])


@contextlib.contextmanager
def stop_signals_delivered():
    """Inside: stop signals are delivered (pending ones at once); after: the caller's mask again."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_UNBLOCK, [getattr(signal, name) for name in STOP_SIGNALS])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def torch_settings(cfg: TrainConfig):
    """Deterministic algorithms, the thread count and the default dtype (float64 for ``fp64``:
    the model is built in it, inputs and targets follow it) for the run; the caller's come back after."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision == "fp64":
        torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _train(cfg: TrainConfig, log, progress: bool, dist: Distributed) -> dict:
    run = RunDir(cfg.out)
    cfg.world_size = dist.world_size  # part of the settings: the global batch depends on it
    saved = run.config()
    if saved is not None:
        saved.setdefault("world_size", 1)  # runs from before DDP
        for key, value in (("recipe", "generic"), ("recipe_options", {}), ("init_from", None)):
            saved.setdefault(key, value)  # runs from before recipes
    if saved is not None and same_settings(saved, cfg.to_dict()):
        raise ConfigError(
            f"{run.path} holds a run with other settings ({', '.join(same_settings(saved, cfg.to_dict()))}); "
            "resume it with the same settings or choose another --out"
        )
    if selected_metric(cfg) not in metric_names(cfg):
        raise ConfigError(
            f"select {cfg.select!r} is not a metric of this run's evaluations; e.g. "
            f"{', '.join(metric_names(cfg)[:1] + [n for n in metric_names(cfg) if '/real-' in n][:1])}"
        )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = dist.device(resolve_device(cfg.device))
    dist.start(device)

    # -------------------------------------------------------------------- data
    recipe = get_recipe(cfg.recipe)
    if cfg.precision == "fp64" and not recipe.split_invariant_loss:
        raise ConfigError(f"--precision fp64 is for recipes with the split-invariant loss (generic), not {recipe.name}")
    cues = assemble.open_cues(cfg, log=log)
    if saved is not None:
        assemble.check_same_data(run, cfg, cues)
    model = recipe.build(cfg, cues)
    if cfg.init_from and saved is None:
        assemble.init_weights(model, recipe, cfg.init_from, log)
    model = model.to(device)
    num_queries = model.config.num_queries
    train_set = assemble.dataset(
        cfg, cues, cfg.train_split, num_queries=num_queries, training=True, active_encoding=recipe.active_encoding
    )
    sampler = EpochSampler(len(train_set), cfg.seed, rank=dist.rank, world_size=dist.world_size)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_frames,
        num_workers=cfg.workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=leave_stops_to_the_parent,  # a stop signal to the process group is the loop's to handle
    )
    global_batch = cfg.batch_size * dist.world_size  # clips per micro-batch over all ranks
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / global_batch) / cfg.accumulate)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)

    # -------------------------------------------------------------------- optimisation
    groups = recipe.parameter_groups(model, cfg)
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    split_invariant = dist.active if cfg.split_invariant_loss is None else cfg.split_invariant_loss
    split_loss = SplitInvariantLoss(model, dist, cfg.seed) if split_invariant and recipe.split_invariant_loss else None
    autocast = autocast_for(cfg.precision, device)

    # -------------------------------------------------------------------- start or resume
    step, epoch, position = 0, 0, 0
    if saved is not None and run.done:
        log(f"{run.path}: the run is complete (rerun evaluations with `soundstage evaluate --run {run.path}`)")
        return (run.records("epochs.jsonl") or [{}])[-1]
    resuming = saved is not None and has_checkpoint(run.checkpoint)
    dist.barrier()  # every rank has looked before rank 0 writes
    if resuming:
        state = resume_checkpoint(
            run.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, log=log, set_aside=dist.main
        )
        step, epoch, position = state["step"], state["epoch"], state["position"]
        if dist.main:
            run.keep_records("steps.jsonl", lambda r: r["step"] <= step)
            run.keep_records("epochs.jsonl", lambda r: r["epoch"] <= epoch)
        log(f"resuming {run.path} at step {step} (epoch {epoch}, {position} clips into it)")
    elif dist.main:
        run.write_json("config.json", cfg.to_dict())
        run.write_json("provenance.json", assemble.run_provenance(cfg, cues))
        for name in ("steps.jsonl", "epochs.jsonl"):
            run.keep_records(name, lambda r: False)
    tracking = Tracking(cfg.tracker if dist.main else [], run, cfg.to_dict(), resume_step=step if resuming else None)
    trained = model
    if dist.active:
        # find_unused_parameters: some of Mask2Former's parameters take no part in the loss
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device)] if device.startswith("cuda") else None, find_unused_parameters=True
        )

    def checkpoint():
        if dist.main:
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
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is on disk

    # -------------------------------------------------------------------- the loop
    trained.train()
    bar = progress_bar(total_steps, "train", progress, unit="step", initial=step)
    last_eval = {}
    with StopSignals() as signals, stop_signals_delivered(), contextlib.closing(tracking):
        while epoch < cfg.epochs and step < total_steps:
            sampler.set_epoch(epoch, position // dist.world_size)
            batches = iter(loader)
            previous = None
            while step < total_steps and position < len(train_set):
                count = min(cfg.accumulate, math.ceil((len(train_set) - position) / global_batch))
                micro_batches = []
                for _ in range(count):
                    batch = next(batches, None)
                    if batch is None:  # this rank's share of the epoch is spent: join with weight 0
                        previous = previous or collate_frames([train_set[0]])
                        micro_batches.append((previous, 0.0))
                    else:
                        micro_batches.append((batch, 1.0))
                        previous = batch
                started = time.perf_counter()
                rank_losses: dict[str, float] = {}  # the loss and its parts, summed over micro-batches
                for k, (batch, weight) in enumerate(micro_batches):
                    last = k == len(micro_batches) - 1
                    with contextlib.nullcontext() if last or not dist.active else trained.no_sync():
                        with autocast() if autocast else contextlib.nullcontext():
                            loss, loss_parts = with_parts(
                                recipe.loss(trained, batch, device, split_loss=split_loss, step=step, weight=weight)
                            )
                        loss = loss * weight / len(micro_batches)
                        (scaler.scale(loss) if scaler else loss).backward()
                    rank_losses["loss"] = rank_losses.get("loss", 0.0) + loss.item()
                    for name, value in loss_parts.items():
                        rank_losses[name] = rank_losses.get(name, 0.0) + float(value) * weight / len(micro_batches)
                names = sorted(rank_losses)  # the global batch's loss and parts: the mean over ranks
                parts = dict(zip(names, (dist.sum([rank_losses[n] for n in names], device) / dist.world_size).tolist()))
                if scaler:
                    scaler.unscale_(optimizer)
                # the norm before clipping; without --clip-grad only measured (an infinite limit)
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad or math.inf))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                clips = min(len(train_set), position + len(micro_batches) * global_batch) - position
                position += clips

                seconds = time.perf_counter() - started
                if step % cfg.log_every == 0 and dist.main:
                    record = {
                        "step": step,
                        "epoch": epoch,
                        **parts,
                        "lr": scheduler.get_last_lr()[0],
                        "clips_per_s": round(clips / seconds, 4),
                        "step_seconds": round(seconds, 4),
                    }
                    run.append("steps.jsonl", record)
                    tracking.step(record)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", step_s=f"{seconds:.2f}", epoch=epoch, refresh=False)
                bar.update(1)
                stopping = dist.any(signals.received is not None, device) if dist.active else signals.received
                if step % cfg.checkpoint_every == 0 or stopping:
                    checkpoint()
                if stopping:
                    bar.close()
                    raise Stopped(signals.received or "a signal to another rank", step)
            if position >= len(train_set) or step >= total_steps:
                epoch, position = epoch + 1, 0
                if epoch % cfg.eval_every == 0 or step >= total_steps:
                    with random_states_kept():
                        last_eval = evaluate_run(cfg, run, model, cues, epoch, step, device, autocast, num_queries, log, dist)
                        if dist.main:
                            keep_best(run, model, last_eval, selected_metric(cfg), log)
                        if tracking.active:
                            shown = assemble.dataset(
                                cfg, cues, cfg.eval_split, num_queries=num_queries, active_encoding=recipe.active_encoding
                            )
                            tracking.evaluation(last_eval, shown_frames(model, shown, cfg.task, device, recipe.predict))
                checkpoint()
    bar.close()

    if dist.main:
        run.save_model(model, "last")
        run.write_json("DONE", {"step": step, "epoch": epoch})
    dist.barrier()
    return last_eval


@contextlib.contextmanager
def random_states_kept():
    """Inside, random numbers may be drawn (the muted probe builds the audio model, whose layers
    initialise before its weights load); after, every global random state is as before, so
    evaluating changes nothing the training draws and a run trains the same whatever ``eval_every``."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def with_parts(loss) -> tuple[torch.Tensor, dict]:
    """A recipe's loss as (the loss, ``{"loss_<part>": detached value}``): a tensor has no parts;
    a dict holds ``"loss"`` and its parts."""
    if not isinstance(loss, dict):
        return loss, {}
    return loss["loss"], {f"loss_{name}": value.detach() for name, value in loss.items() if name != "loss"}


def keep_best(run: RunDir, model, record: dict, metric: str, log) -> None:
    """``model/best`` (with ``best.json``) when ``metric`` of this evaluation beats the best so far."""
    value, best = metric_values(record).get(metric), run.best()
    if value is None or (best is not None and best.get("metric") == metric and value <= best["value"]):
        return
    run.save_model(model, "best", {"metric": metric, "value": value, "step": record["step"], "epoch": record["epoch"]})
    log(f"model/best: {metric} {value:.4f} (epoch {record['epoch']}, step {record['step']})")


def evaluate_run(
    cfg, run: RunDir, model, cues, epoch: int, step: int, device, autocast, num_queries, log, dist: Distributed | None = None
) -> dict:
    """Every audio variant on the evaluation split; one line of epochs.jsonl and the curves.
    With several ranks each scores its share and the metric totals are summed."""
    dist = dist or Distributed()
    recipe = get_recipe(cfg.recipe)
    encoding = recipe.active_encoding
    results = {}
    for variant in ["real", *cfg.probes]:
        silence = None
        if variant == "muted":
            probe_set = assemble.dataset(cfg, cues, cfg.eval_split, num_queries=num_queries, active_encoding=encoding)
            if dist.main:  # computed once, by rank 0; the others read its file
                silence = assemble.silence_for(run, cues, assemble.max_frames(probe_set))
            dist.barrier()
            silence = assemble.silence_for(run, cues, assemble.max_frames(probe_set))
        data = assemble.dataset(
            cfg, cues, cfg.eval_split, variant, silence=silence, num_queries=num_queries, active_encoding=encoding
        )
        headline, others = run_protocols(cfg)
        scores = evaluate(
            model,
            data,
            cfg.task,
            [headline, *others],
            device=device,
            autocast=autocast,
            batch_size=cfg.eval_batch_size,
            workers=cfg.workers,
            dist=dist,
            predict=recipe.predict,
        )
        results[variant] = with_protocols(scores, headline)
    record = {"epoch": epoch, "step": step, "split": cfg.eval_split, "eval": results}
    steps = [r["loss"] for r in run.records("steps.jsonl") if r["epoch"] == epoch - 1]
    record["train_loss"] = float(np.mean(steps)) if steps else None
    if "muted" in results:
        record["gap_real_muted"] = {k: _gap(results["real"].get(k), results["muted"].get(k)) for k in ("miou", "fscore")}
    if dist.main:
        run.append("epochs.jsonl", record)
        plot_curves(run)
    shown = "  ".join(f"{v} mIoU {r.get('miou', float('nan')):.4f}" for v, r in results.items())
    log(f"epoch {epoch} ({cfg.eval_split}): {shown}")
    return record


def _gap(a, b):
    return None if a is None or b is None else a - b
