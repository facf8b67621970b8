"""The run directory: everything a training run writes, in one documented layout::

    runs/NAME/
      config.json            the resolved settings (soundstage.train.config.TrainConfig)
      provenance.json        what it was trained on: per cue role the cache output read (path,
                             stage, version, fingerprint, stage.json parameters and upstream
                             fingerprints), the manifest (path, sha256), the base model, versions
      checkpoints/latest.pt  the last checkpoint (soundstage.train.checkpoint; weights_only-loadable)
      metrics/steps.jsonl    one JSON object per optimizer step: step, epoch, loss and its parts
                             (loss_class, loss_mask, loss_dice, ...), lr, grad_norm, clips_per_s,
                             step_seconds
      metrics/epochs.jsonl   one per evaluation: epoch, step, train_loss, and per audio variant
                             (real, muted, zeroed, swapped, noise:SNR) the headline protocol's
                             result, with ``protocols``: every protocol's miou/fscore;
                             ``gap_real_muted`` = real − muted mIoU and F
      silence/<stage>-<fingerprint>-<field>.npy   the muted cue, computed once
      curves.png             loss, validation mIoU/F and audio sensitivity per epoch
      tb/                    TensorBoard event files (--tracker; wandb/ and mlruns/ likewise)
      model/last/            the final model: transformers save_pretrained + avs_conditioning.*
      model/best/            the model of the evaluation with the best --select metric, with
                             best.json: metric, value, step, epoch
      train.lock             flock'ed by the process training the run ("pid P on HOST since ...")
      DONE                   written when the run finished every epoch

Runs written before ``model/last`` existed hold the final model in ``model/`` itself: it is read
as ``last``.

Metric names: ``soundstage.train.metric_names``.

A rerun with the same settings resumes from ``checkpoints/latest.pt``; metric lines written after
that checkpoint are dropped first, so each step and epoch appears once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time

from soundstage.train.config import ConfigError

TRAINER_LOCK = "train.lock"
WEIGHTS = ("best", "last")


class RunBusy(ConfigError):
    """Another process is training into the same run folder."""


class MissingWeights(ConfigError):
    """The run has not (yet) the weights asked for."""


class RunDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def checkpoint(self) -> str:
        return self.file("checkpoints", "latest.pt")

    def model_dir(self, which: str = "last") -> str:
        return self.file("model", which)

    def save_model(self, model, which: str, info: dict | None = None) -> str:
        """``model/<which>/`` replaced as a whole: written beside it, then swapped in (``info``:
        ``<which>.json`` inside it)."""
        final = self.model_dir(which)
        fresh, old = self.file("model", f".{which}.new"), self.file("model", f".{which}.old")
        for leftover in (fresh, old):
            shutil.rmtree(leftover, ignore_errors=True)
        model.save_pretrained(fresh)
        if info is not None:
            write_json(os.path.join(fresh, f"{which}.json"), info)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(fresh, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def best(self) -> dict | None:
        """``model/best/best.json`` (metric, value, step, epoch), None without a best model."""
        return read_json(self.file("model", "best", "best.json"))

    def weights(self, which: str | None = None) -> tuple[str, str]:
        """``(path, what)`` of the weights to load: ``which`` best or last; None: best when the run
        has one, else last. ``what``: best, last, or checkpoint (an unfinished run's last
        checkpoint stands for last)."""
        if which not in (None, *WEIGHTS):
            raise MissingWeights(f"weights {which!r}: use best or last")
        if which in (None, "best") and os.path.isdir(self.model_dir("best")):
            return self.model_dir("best"), "best"
        if which == "best":
            raise MissingWeights(f"{self.path} has no best model yet (model/best is written at evaluations); use last")
        for path in (self.model_dir("last"), self.file("model")):  # model/ itself: runs from before model/last
            if os.path.exists(os.path.join(path, "config.json")):
                return path, "last"
        if os.path.exists(self.checkpoint):
            return self.checkpoint, "checkpoint"
        raise MissingWeights(f"{self.path} has neither a final model nor a checkpoint yet")

    @property
    def done(self) -> bool:
        return os.path.exists(self.file("DONE"))

    @contextlib.contextmanager
    def trainer(self, hold: bool = True):
        """While it is held, this process is the one training into the folder; a second one is
        refused with ``RunBusy`` naming the first. (``flock``: the kernel releases it when the holder
        dies, so a killed or requeued run never leaves a stale lock.) ``hold=False``: a rank other
        than 0, whose rank 0 holds it."""
        if not hold:
            yield
            return
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.file(TRAINER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunBusy(
                    f"{self.path} is being trained by {holder}; wait for it to end (or stop it), or choose another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def config(self) -> dict | None:
        return read_json(self.file("config.json"))

    def write_json(self, name: str, value) -> None:
        write_json(self.file(name), value)

    def append(self, name: str, record: dict) -> None:
        path = self.file("metrics", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()

    def records(self, name: str) -> list[dict]:
        path = self.file("metrics", name)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def keep_records(self, name: str, keep) -> None:
        """Rewrite a metrics file with only the records ``keep(record)`` accepts (atomically)."""
        records = [r for r in self.records(name) if keep(r)]
        path = self.file("metrics", name)
        if not os.path.exists(path):
            return
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plot_curves(run: RunDir) -> str:
    """``curves.png``: training loss per step; validation mIoU and F per audio variant per epoch;
    the audio sensitivity (real − each replacement, mIoU) per epoch."""
    import matplotlib  # heavy, only curves.png needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # heavy, only curves.png needs it

    steps, epochs = run.records("steps.jsonl"), run.records("epochs.jsonl")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    variants = list(epochs[-1]["eval"]) if epochs else []
    for variant in variants:
        xs = [r["epoch"] for r in epochs if variant in r["eval"]]
        axes[1].plot(xs, [r["eval"][variant].get("miou") for r in epochs if variant in r["eval"]], marker="o", label=variant)
        axes[2].plot(xs, [r["eval"][variant].get("fscore") for r in epochs if variant in r["eval"]], marker="o", label=variant)
        if variant != "real":
            gaps = [
                _difference(r["eval"]["real"].get("miou"), r["eval"][variant].get("miou")) for r in epochs if variant in r["eval"]
            ]
            axes[3].plot(xs, gaps, marker="o", label=f"real - {variant}")
    axes[3].axhline(0.0, color="grey", lw=0.6)
    axes[3].set(title="audio sensitivity (mIoU lost without the real audio)", xlabel="epoch")
    split = epochs[-1].get("split", "") if epochs else ""
    axes[1].set(title=f"{split} mIoU by audio", xlabel="epoch")
    axes[2].set(title=f"{split} F-score by audio", xlabel="epoch")
    for ax in axes[1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = run.file("curves.png")
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def _difference(a, b):
    return None if a is None or b is None else a - b
