"""One rank of tests/test_train_ddp.py's evaluation check: scores its share of the videos with
each protocol, sums the Accumulator totals over the ranks (gloo) and, on rank 0, writes the
results as JSON. Kept apart from the test module so the spawned ranks import little."""

from __future__ import annotations

import json
import os

import torch

from soundstage.metrics import Accumulator
from soundstage.train.distributed import Distributed, rank_indices, reduce_accumulator

PROTOCOLS = {
    "avsbench-binary": {"pred_kind": "logits"},
    "segpref": {"pred_kind": "logits"},
    "bias-in-avs": {"pred_kind": "logits"},
    "avsbench-semantic": {"pred_kind": "logits", "num_classes": 4},
    "cavp-dataset": {"pred_kind": "logits", "num_classes": 4},
}


def score(protocol: str, data: dict, dist: Distributed) -> dict:
    accumulator = Accumulator(protocol, **PROTOCOLS[protocol])
    kind = "semantic" if "num_classes" in PROTOCOLS[protocol] else "binary"
    pred, gt = data[f"{kind}_pred"], data[f"{kind}_gt"]
    for video in rank_indices(len(pred), accumulator.options.get("batch_size") or 1, dist):
        accumulator.update(pred[video], gt[video], videos=[f"v{video}"] * len(gt[video]))
    reduce_accumulator(accumulator, dist)
    return accumulator.compute()


def rank_main(rank: int, world_size: int, port: int, data_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = Distributed(rank, world_size, rank)
    dist.start("cpu")
    try:
        data = torch.load(data_path, weights_only=True)
        results = {protocol: score(protocol, data, dist) for protocol in PROTOCOLS}
        if dist.main:
            with open(out, "w") as f:
                json.dump(results, f, default=float)
    finally:
        dist.stop()
