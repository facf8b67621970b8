"""Experiment tracking: what the loop writes to ``metrics/*.jsonl`` also goes to TensorBoard
(the default), Weights & Biases and/or MLflow (``--tracker``, several at once; ``none``: only
the JSONL files and ``curves.png``, which need no server and are always written).

The loop sees one small interface, ``Tracking``: ``step(record)`` with each ``steps.jsonl``
record, ``evaluation(record, images)`` with each ``epochs.jsonl`` record and a few validation
frames, ``close()``. What the trackers get:

- per step ``train/loss``, its parts ``train/loss_class``, ``train/loss_mask``,
  ``train/loss_dice`` (and any other term of the loss), ``train/lr``, ``train/grad_norm``,
  ``train/clips_per_s``, ``train/step_seconds``;
- per evaluation ``train/epoch_loss`` and every number of the evaluation under its name
  (``soundstage.train.metric_names``): each protocol's mIoU and F with each audio
  variant, and the sensitivities, e.g. ``val/avsbench-binary/miou``,
  ``val/avsbench-binary/muted/miou``, ``val/avsbench-binary/real-swapped/miou``;
- images ``val/frames/<clip id>``: the first frame of the first ``SHOWN_CLIPS`` clips of the
  evaluation split (always the same), the prediction filled and the ground truth outlined.

Where: TensorBoard event files in ``RUN/tb/`` (``tensorboard --logdir runs``); W&B offline in
``RUN/wandb/`` (upload later with ``wandb sync RUN/wandb/offline-run-*``; project
``$WANDB_PROJECT``, default soundstage); MLflow at ``$MLFLOW_TRACKING_URI`` when set, else the
file store ``RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``; experiment
``$MLFLOW_EXPERIMENT_NAME``, default soundstage).

Resuming from the checkpoint of step k: TensorBoard drops what was written after it (the
writer's ``purge_step``: every event from step k + 1 on, or from step k when the checkpoint
came before step k's evaluation, whose step-k training record is then written again), so each
step appears once. W&B and MLflow logs cannot drop anything: the resumed run continues the
same W&B / MLflow run (ids in ``RUN/tracking.json``) and skips the steps they already received
(also recorded there), which a resumed run reproduces exactly (``soundstage.train.checkpoint``).

Under DDP only rank 0 tracks.
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np
import torch

from soundstage.train.config import ConfigError
from soundstage.train.data import collate_frames
from soundstage.train.metric_names import metric_values
from soundstage.train.report_parts import frame_image, overlay
from soundstage.train.run_dir import RunDir, read_json, write_json

SHOWN_CLIPS = 4
STATE_FILE = "tracking.json"


class TensorBoard:
    def __init__(self, run: RunDir, purge_step: int):
        # imported here: tensorboard is needed only by runs that track with it
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(run.file("tb"), purge_step=purge_step)

    def scalars(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def images(self, images: dict, step: int) -> None:
        for name, image in images.items():
            self.writer.add_image(name, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run: RunDir, config: dict, state: dict):
        # imported here: wandb is an optional extra, needed only with --tracker wandb
        import wandb

        state.setdefault("id", secrets.token_hex(6))
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "soundstage"),
            name=os.path.basename(run.path),
            id=state["id"],
            resume="allow",
            dir=run.path,
            mode="offline",
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def images(self, images: dict, step: int) -> None:
        self.run.log({name: self.wandb.Image(image) for name, image in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run: RunDir, config: dict, state: dict):
        # imported here: mlflow is an optional extra, needed only with --tracker mlflow
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        state.setdefault("uri", os.environ.get("MLFLOW_TRACKING_URI") or "file:" + run.file("mlruns"))
        if state["uri"].startswith("file:"):
            # MLflow 3 keeps its file store (what needs no server or database) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(state["uri"])
        if "run_id" not in state:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "soundstage")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            state["run_id"] = self.client.create_run(experiment_id, run_name=os.path.basename(run.path)).info.run_id
            self.client.log_batch(state["run_id"], params=_mlflow_params(config))
        self.run_id = state["run_id"]

    def scalars(self, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def images(self, images: dict, step: int) -> None:
        for name, image in images.items():
            self.client.log_image(self.run_id, image, key=_mlflow_key(name), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracking:
    """The trackers of a run (none on ranks other than 0)."""

    def __init__(self, names: list[str], run: RunDir, config: dict, resume_step: int | None = None):
        self.run, self.backends, self.append_only = run, [], []
        if not names:
            return
        state = (read_json(run.file(STATE_FILE)) or {}) if resume_step is not None else {}
        self.sent = state.setdefault("sent", {"train": -1, "eval": -1})
        replay = []
        try:
            if "tensorboard" in names:
                purge, replay = _tensorboard_restart(run, resume_step)
                self.backends.append(TensorBoard(run, purge))
            if "wandb" in names:
                self.append_only.append(WandB(run, config, state.setdefault("wandb", {})))
            if "mlflow" in names:
                self.append_only.append(MLflow(run, config, state.setdefault("mlflow", {})))
        except ImportError as e:
            self.close()
            raise ConfigError(
                f'--tracker: {e.name or e} is not installed (pip install tensorboard, or "soundstage[tracking]" '
                "for wandb and mlflow); --tracker none tracks nothing"
            ) from None
        self.state = state
        if self.append_only:
            write_json(run.file(STATE_FILE), state)
        for record in replay:
            for backend in self.backends:
                backend.scalars(step_scalars(record), record["step"])

    @property
    def active(self) -> bool:
        return bool(self.backends or self.append_only)

    def step(self, record: dict) -> None:
        self._send("train", step_scalars(record), {}, record["step"])

    def evaluation(self, record: dict, images: dict | None = None) -> None:
        values = metric_values(record)
        if record.get("train_loss") is not None:
            values["train/epoch_loss"] = record["train_loss"]
        self._send("eval", values, images or {}, record["step"])

    def _send(self, kind: str, values: dict, images: dict, step: int) -> None:
        for backend in self.backends:
            backend.scalars(values, step)
            if images:
                backend.images(images, step)
        if self.append_only and step > self.sent[kind]:
            for backend in self.append_only:
                backend.scalars(values, step)
                if images:
                    backend.images(images, step)
            self.sent[kind] = step
            write_json(self.run.file(STATE_FILE), self.state)

    def close(self) -> None:
        for backend in [*self.backends, *self.append_only]:
            backend.close()
        self.backends, self.append_only = [], []


def step_scalars(record: dict) -> dict:
    """A ``steps.jsonl`` record as ``train/...`` scalars."""
    return {f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch") and v is not None}


def _tensorboard_restart(run: RunDir, resume_step: int | None) -> tuple[int, list[dict]]:
    """(purge_step, training records to write again) — see the module docstring."""
    if resume_step is None:
        return 0, []  # a fresh start: nothing of an earlier attempt in this folder stays
    if any(r["step"] == resume_step for r in run.records("epochs.jsonl")):
        return resume_step + 1, []
    return resume_step, [r for r in run.records("steps.jsonl") if r["step"] == resume_step]


@torch.no_grad()
def shown_frames(model, dataset, task: str, device, predict, count: int = SHOWN_CLIPS) -> dict[str, np.ndarray]:
    """``val/frames/<clip id>`` -> ``[H, W, 3]`` uint8: the first frame of each of the dataset's
    first ``count`` clips at the report's display size, prediction (real audio; ``predict``: the recipe's)
    and ground truth overlaid."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        return {}
    batch = collate_frames(
        [{k: v[:1] for k, v in item.items() if k != "clip_id"} | {"clip_id": item["clip_id"]} for item in items]
    )
    was_training = model.training
    model.eval()
    labels = batch["labels"]
    try:
        scores = predict(model, batch, device, tuple(labels.shape[-2:]), task, False).float().cpu()
    finally:
        model.train(was_training)
    masks = scores.argmax(1) if task == "semantic" else (scores > 0).long()
    shown = {}
    for k, item in enumerate(items):
        image = frame_image(dataset.rows[k], int(item["frames"][0]), dataset.manifest_dir)
        shown[f"val/frames/{item['clip_id']}"] = overlay(image, masks[k].numpy(), labels[k].numpy(), task == "semantic")
    return shown


def _mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits and _-./ and space."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _mlflow_params(config: dict) -> list:
    from mlflow.entities import Param  # optional extra (see MLflow)

    return [Param(k, str(v)[:500]) for k, v in sorted(config.items())]
