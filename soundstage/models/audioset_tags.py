"""AudioSet tags from the probabilities a beats output stored: column -> MID -> display name.

Shared by ``soundstage tags`` and the run report. Class names go through the MIDs of the
checkpoint's ``label_dict`` (column i of the output is ``label_dict[i]``) and the AudioSet class list
shipped in ``soundstage/data/audioset`` — never by row order.
"""

from __future__ import annotations

import os
from collections import Counter

import click
import numpy as np
import torch

from soundstage.cache.store import StageDir
from soundstage.models.beats import audioset_classes
from soundstage.pipeline.identity import model_identity

DEFAULT_THRESHOLD = 0.4  # as in the active-queries work


def class_mids_of_output(stage_dir, checkpoint: str | None = None) -> list[str]:
    """The MID of each probability column of a beats output.

    Read from the checkpoint's ``label_dict``: the one the output was made with (its path is
    in stage.json) or ``checkpoint``; either must have the content hash in the fingerprint, so
    a different checkpoint can never name the columns.
    """

    sd = stage_dir if isinstance(stage_dir, StageDir) else StageDir(stage_dir)
    meta = sd.meta()
    stored = meta.get("metadata", {}).get("class_mids")
    if stored:
        return list(stored)
    path = checkpoint or meta["params"].get("checkpoint")
    if not path or not os.path.isfile(path):
        raise click.ClickException(f"the checkpoint of {sd.path} ({path}) is not there; pass --checkpoint PATH")
    if model_identity(path) != meta["fingerprint_payload"]["params"]["checkpoint"]:
        raise click.ClickException(f"{path} is not the checkpoint {sd.path} was computed with (content differs)")
    label_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("label_dict")
    if not label_dict:
        raise click.ClickException(f"{path} has no label_dict")
    return [label_dict[i] for i in range(len(label_dict))]


class TagNamer:
    """Column index -> display name for one beats output."""

    def __init__(self, mids: list[str]):

        names = dict(audioset_classes())
        self.names = [names.get(mid, mid) for mid in mids]  # an unknown MID shows as itself

    def top(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs.astype(np.float32), kind="stable")[:k]
        return [(self.names[i], float(probs[i])) for i in order]

    def above(self, probs: np.ndarray, threshold: float) -> list[str]:
        """Names of the classes at or above ``threshold``, most probable first."""
        return [name for name, p in self.top(probs, len(probs)) if p >= threshold]


def tag_counts(reader, clip_ids, namer: TagNamer, threshold: float) -> tuple[Counter, int]:
    """How many of ``clip_ids`` have each class as a clip-level tag, and how many have any tag."""
    counts, tagged = Counter(), 0
    for cid in clip_ids:
        names = namer.above(np.asarray(reader[cid]["clip_probs"]), threshold)
        counts.update(names)
        tagged += bool(names)
    return counts, tagged
