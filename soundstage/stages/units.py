"""units: k-means unit ids per HuBERT frame, and their summary per video frame.

For each clip: ``units`` is the nearest centroid of every 50 Hz feature frame (fairseq
``dump_km_label.py``'s argmin, in float64). Video frames are one per second in AVSBench, so
second ``i`` = feature frames ``50 i … 50 i + 49``; per second the stage stores the frame count,
the majority unit, the ``--top-k`` most frequent units and the normalised histogram over the
K units — the per-frame cluster ids that "active queries" are built from. The number of
seconds is the clip's video frame count from the manifest (``num_frames``), else the audio's
length; a second without audio frames has count 0, units -1 and an all-zero histogram.

The work is cheap and runs in the decoding workers (centroids are read once per process).

``export_km`` (behind ``soundstage export km``) writes fairseq's ``.km`` text format: one line of
space-separated unit ids per clip, with a file of the clip ids in the same order.
"""

import math
import os

import numpy as np

from soundstage.cache import open_stage
from soundstage.manifests.table import frame_count
from soundstage.models.kmeans import nearest_centroid
from soundstage.pipeline.stage import Field, Param, Stage, Upstream

FRAMES_PER_SECOND = 50  # HuBERT's frame rate at 16 kHz (hop 320)


def per_second(units: np.ndarray, num_units: int, seconds: int, top_k: int) -> dict:
    """Count, majority, top-k (by count, ties to the lower id, -1 past the present units) and
    normalised histogram of the units of each second."""
    counts = np.zeros((seconds, num_units), dtype=np.int64)
    for i in range(seconds):
        segment = units[i * FRAMES_PER_SECOND : (i + 1) * FRAMES_PER_SECOND]
        counts[i] = np.bincount(segment, minlength=num_units)
    # stable sort of -count keeps equal counts in id order
    order = np.argsort(-counts, axis=1, kind="stable")[:, :top_k]
    topk = np.where(np.take_along_axis(counts, order, 1) > 0, order, -1)
    totals = counts.sum(1)
    hist = counts / np.maximum(totals, 1)[:, None]
    return {
        "frame_counts": totals.astype(np.int32),
        "frame_majority": topk[:, 0].astype(np.int32),
        "frame_topk": topk.astype(np.int32),
        "frame_hist": hist.astype(np.float32),
    }


def video_seconds(row: dict, num_audio_frames: int) -> int:
    frames = frame_count(row)
    return frames if frames else max(1, math.ceil(num_audio_frames / FRAMES_PER_SECOND))


def load(row, ctx):
    centroids = ctx.upstream["kmeans"]["centroids"]
    feats = ctx.upstream["hubert"][row["clip_id"]]["features"]
    units, _ = nearest_centroid(feats, centroids)
    summary = per_second(units, len(centroids), video_seconds(row, len(units)), ctx.params["top_k"])
    return {"units": units.astype(np.int32), **summary}


def process(model, items, params):
    return items  # computed in the workers


STAGE = Stage(
    name="units",
    reads=("num_frames",),  # manifest columns load uses (their files are digested too)
    version=1,
    help="k-means unit per HuBERT frame, and per video frame (second) the majority, top-k and histogram.",
    upstream=[Upstream("hubert", "hubert"), Upstream("kmeans", "kmeans")],
    params=[Param("top_k", int, 3, "most frequent units kept per second")],
    fields=[
        Field("units", "int32", (None,), "nearest centroid of each 50 Hz frame"),
        Field("frame_counts", "int32", (None,), "feature frames in second i"),
        Field("frame_majority", "int32", (None,), "most frequent unit in second i (-1: no frames)"),
        Field("frame_topk", "int32", (None, None), "[seconds, top_k] most frequent units, -1 past the present ones"),
        Field("frame_hist", "float32", (None, None), "[seconds, K] share of each unit; rows sum to 1 (0 without frames)"),
    ],
    load=load,
    process=process,
    default_batch_size=64,
)


# ---------------------------------------------------------------------------- .km export


def export_km(units_dir: str, km_path: str, ids_path: str | None = None, clip_ids=None) -> tuple[list, np.ndarray]:
    """Write fairseq's ``.km`` (one line of space-separated units per clip) and the clip id list.

    ``clip_ids`` fixes the order (e.g. the manifest's); default: sorted. Returns the clip ids
    written and how often each of the K units occurs in them (``[K]``, for ``dict.km.txt``).
    """
    reader = open_stage(units_dir, fields=["units", "frame_hist"])
    ids = sorted(reader) if clip_ids is None else list(clip_ids)
    missing = [cid for cid in ids if cid not in reader]
    if missing:
        raise KeyError(f"{len(missing)} clips have no units in {units_dir}, e.g. {missing[:3]}")
    ids_path = ids_path or os.path.splitext(km_path)[0] + ".ids"
    counts = None
    with open(km_path, "w") as km, open(ids_path, "w") as id_file:
        for cid in ids:
            record = reader[cid]
            if counts is None:
                counts = np.zeros(record["frame_hist"].shape[1], dtype=np.int64)  # K
            counts += np.bincount(record["units"], minlength=len(counts))
            km.write(" ".join(map(str, record["units"].tolist())) + "\n")
            id_file.write(cid + "\n")
    return ids, counts if counts is not None else np.zeros(0, dtype=np.int64)
