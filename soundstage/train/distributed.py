"""Training on several processes (PyTorch DDP): who this process is, the collectives the loop
needs, and a Mask2Former loss whose value does not depend on how a batch is split.

**Processes.** A process is a rank of a DDP run when the environment says so, as ``torchrun``
and ``soundstage train --nproc`` set it: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. The backend is NCCL on GPUs (rank ``LOCAL_RANK`` uses
``cuda:LOCAL_RANK``) and gloo on CPU.

**Global batch.** ``batch_size`` is per process: one optimizer step sees ``batch_size ×
accumulate × world_size`` clips. Global micro-batch ``g`` of an epoch is the items
``g·B·W .. (g+1)·B·W`` of the epoch's permutation; rank ``r`` takes every ``W``-th of them from
``r`` on (``EpochSampler(rank=r, world_size=W)``), so the union over ranks is exactly the
micro-batch a one-process run with ``batch_size = B·W`` sees. A rank with nothing left in the
epoch's last micro-batch runs its previous one with weight 0 (it must still join the gradient
all-reduce). The sampler's position (global items of the epoch consumed) is in the checkpoint;
rank ``r`` resumes at ``position / W`` of its share.

**A loss independent of the split.** transformers' Mask2Former criterion normalises by the
batch's own mask count and class weights and draws its random sample points from the global
RNG in batch order, so its gradient on a batch split over ranks differs from the whole batch's.
``SplitInvariantLoss`` (installed for runs on several processes, and on one process with the
setting ``split_invariant_loss: true``) makes three changes on the criterion instance, reusing
transformers' code for everything else:

* the mask count (mask/dice normaliser) and the sum of class weights (cross-entropy normaliser)
  are totals over all ranks (``all_reduce``), divided by ``W`` because DDP averages gradients —
  as the reference Mask2Former all-reduces its mask count;
* the matcher and the uncertainty point sampling of the mask losses run per frame, with the
  global RNG reseeded from (run seed, step, clip id, frame, decoder layer) for each frame and
  restored after: the same frame at the same step gets the same points in any batch, on any rank;
* the rest (Hungarian matching, uncertainty sampling, losses) is transformers' own code.

So a run on ``W`` processes with batch ``B`` equals a one-process run with batch ``B·W`` and
``split_invariant_loss: true`` up to float rounding: per step (the same gradient from the same
weights); over a run in float32, AdamW's per-element normalisation amplifies the rounding of
near-zero gradient elements, so tests/test_train_ddp.py compares whole runs in ``fp64``. (A plain
one-process run keeps transformers' own draws from the global RNG: the same distribution of
sample points, other values, so the same training statistically but not bit for bit.) Dropout (0 in the tiny model) is the one draw left
to each rank's own RNG; checkpoints hold rank 0's random states.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from soundstage.train.data import frame_clip_ids


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device: ``cuda:LOCAL_RANK`` when the run is on GPUs."""
        if self.active and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def start(self, device: str) -> None:
        if not self.active or torch.distributed.is_initialized():
            return

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("SOUNDSTAGE_DDP_TIMEOUT", 1800)))
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=timeout)

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, values, device: str = "cpu") -> np.ndarray:
        """Element-wise sum over ranks of a number or array (float64 on the wire)."""
        array = np.asarray(values, dtype=np.float64)
        if not self.active:
            return array
        tensor = torch.from_numpy(array.copy()).to(_wire_device(device))
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().numpy()

    def any(self, flag: bool, device: str = "cpu") -> bool:
        return bool(self.sum(float(flag), device) > 0)


def _wire_device(device: str) -> str:
    return device if str(device).startswith("cuda") and torch.distributed.get_backend() == "nccl" else "cpu"


def reduce_accumulator(accumulator, dist: Distributed, device: str = "cpu") -> None:
    """Sum the accumulator's totals over ranks and load the sums (every rank gets the totals)."""
    if not dist.active:
        return
    state = accumulator.state_dict()
    names = sorted(k for k, v in state.items() if v is not None)
    present = dist.sum([float(state.get(k) is not None) for k in sorted(state)], device)
    if any(0 < p < dist.world_size for p in present):
        raise RuntimeError("ranks disagree on the evaluation state (a rank saw no frames?)")
    flat = np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in names]) if names else np.zeros(0)
    total = dist.sum(flat, device)
    summed, at = dict(state), 0
    for k in names:
        shape = np.shape(state[k])
        size = int(np.prod(shape)) if shape else 1
        value = total[at : at + size].reshape(shape)
        summed[k] = value if shape else float(value)
        if isinstance(state[k], np.ndarray) and np.issubdtype(state[k].dtype, np.integer):
            summed[k] = np.rint(value).astype(state[k].dtype)
        at += size
    accumulator.load_state_dict(summed, ranks=dist.world_size)


def rank_indices(size: int, group: int, dist: Distributed) -> list[int]:
    """This rank's items of an evaluation set: whole groups of ``group`` consecutive items
    (the protocol's batch of videos), group ``g`` on rank ``g mod W`` — batches stay whole."""
    group = max(1, group)
    return [i for i in range(size) if (i // group) % dist.world_size == dist.rank]


def frame_keys(batch: dict) -> list[int]:
    """One stable number per frame of a collated batch: (clip id, frame index)."""
    return [zlib.crc32(f"{cid}/{int(f)}".encode()) for cid, f in zip(frame_clip_ids(batch), batch["frames"].tolist())]


class SplitInvariantLoss:
    """Installs itself on ``model.mask2former.criterion``; call ``prepare`` before each forward
    with labels (see the module docstring)."""

    def __init__(self, model, dist: Distributed, seed: int):
        self.criterion = criterion = model.mask2former.criterion
        self.dist, self.seed = dist, seed
        self.queries = int(model.config.num_queries)
        self._match_frame = criterion.matcher.forward
        self._mask_losses = criterion.loss_masks
        self._sample_frame = criterion.sample_points_using_uncertainty
        criterion.matcher.forward = self._match
        criterion.loss_masks = self._loss_masks
        criterion.sample_points_using_uncertainty = self._sample_points
        self._boxes: list[int] = []
        criterion.loss_labels = self._loss_labels
        criterion.get_num_masks = self._num_masks
        self.keys: list[int] = []
        self.step, self.layer = 0, 0
        self.num_masks = self.weight_sum = 1.0

    def prepare(self, class_labels: list, keys: list[int], step: int, weight: float = 1.0, device="cpu") -> None:
        """``weight`` 0: a padding micro-batch (adds nothing to the normalisers; its loss is
        multiplied by 0 by the caller)."""
        self.keys, self.step, self.layer = keys, step, 0
        counts = np.array([len(c) for c in class_labels], dtype=np.float64)
        # cross-entropy weights: 1 per matched query, eos_coef per unmatched one ("no object")
        weights = counts + (self.queries - counts) * float(self.criterion.empty_weight[-1])
        local = [weight * counts.sum(), weight * float(weights.sum())]
        self.num_masks, self.weight_sum = (float(x) for x in self.dist.sum(local, device))

    @contextlib.contextmanager
    def _own_rng(self):
        """The global RNG is reseeded per frame inside and restored after: the run's own random
        stream is not touched by the loss."""
        device = self.criterion.empty_weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield

    def _seed(self, frame: int, purpose: int) -> None:
        words = [self.seed & 0xFFFFFFFF, self.step, self.keys[frame], self.layer, purpose]
        torch.manual_seed(int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1))

    def _match(self, masks, classes, mask_labels, class_labels):
        self.layer += 1
        matched = []
        with self._own_rng():
            for i in range(len(masks)):
                self._seed(i, 0)
                matched += self._match_frame(
                    masks[i : i + 1], classes[i : i + 1], mask_labels[i : i + 1], class_labels[i : i + 1]
                )
        return matched

    def _loss_masks(self, masks, mask_labels, indices, num_masks):
        self._boxes = [len(src) for src, _ in indices]  # matched queries per frame, in frame order
        return self._mask_losses(masks, mask_labels, indices, num_masks)

    def _sample_points(self, logits, uncertainty_function, num_points, oversample_ratio, importance_sample_ratio):
        """transformers' uncertainty sampling, run per frame on that frame's matched masks (the
        rows of ``logits`` come frame by frame) with the frame's own seed."""
        parts, start = [], 0
        with self._own_rng():
            for frame, count in enumerate(self._boxes):
                if count:
                    self._seed(frame, 1)
                    args = (uncertainty_function, num_points, oversample_ratio, importance_sample_ratio)
                    parts.append(self._sample_frame(logits[start : start + count], *args))
                start += count
        return torch.cat(parts)

    def _num_masks(self, class_labels, device):
        return torch.clamp(torch.as_tensor(self.num_masks / self.dist.world_size, dtype=torch.float, device=device), min=1)

    def _loss_labels(self, class_queries_logits, class_labels, indices):
        criterion = self.criterion
        batch, queries, _ = class_queries_logits.shape
        target = torch.full((batch, queries), criterion.num_labels, dtype=torch.int64, device=class_queries_logits.device)
        target[criterion._get_predictions_permutation_indices(indices)] = torch.cat(
            [labels[j] for labels, (_, j) in zip(class_labels, indices)]
        )
        weighted = F.cross_entropy(class_queries_logits.transpose(1, 2), target, weight=criterion.empty_weight, reduction="none")
        return {"loss_cross_entropy": weighted.sum() / (self.weight_sum / self.dist.world_size)}
