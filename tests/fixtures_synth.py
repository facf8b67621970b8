"""Shared fixtures: the synthetic AVSBench dataset (generated once per session) and helpers that
copy it, break it, or rewrite it into the older AVSBench-object layout.

Test modules use them with ``from fixtures_synth import synth_dir`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from soundstage.manifests.synth import TEST_CLIPS, make_synthetic_dataset

_GENERATED: dict[str, str] = {}  # one dataset per session even when several modules import the fixture


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    """A 12-clip synthetic dataset, seed 0. Read-only: copy it (``copy_dataset``) to modify."""
    session = str(tmp_path_factory.getbasetemp())
    if session not in _GENERATED:
        out = str(tmp_path_factory.mktemp("synth") / "avsbench")
        make_synthetic_dataset(out, clips=TEST_CLIPS, seed=0)
        _GENERATED[session] = out
    return _GENERATED[session]


def copy_dataset(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def metadata_rows(root: str) -> list[dict]:
    with open(os.path.join(root, "metadata.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def append_metadata_lines(root: str, lines: list[str]) -> None:
    with open(os.path.join(root, "metadata.csv"), "a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def make_object_layout(unified: str, out: str) -> dict[str, list[dict]]:
    """Rewrite the v1s clips of a synthetic dataset as AVSBench-object S4 (``Single-source/``) and
    the v1m clips as MS3 (``Multi-sources/``), with the original folder and file naming
    (1-based frame numbers, binary masks). Returns the metadata rows written per subset."""
    written = {"s4": [], "ms3": []}
    for row in metadata_rows(unified):
        uid, split, subset = row["uid"], row["split"], row["label"]
        if subset not in ("v1s", "v1m"):
            continue
        clip = os.path.join(unified, subset, uid)
        if subset == "v1s":
            category = row["a_obj"].replace("-", "_")
            data = os.path.join(out, "Single-source", "s4_data")
            frames = os.path.join(data, "visual_frames", split, category, uid)
            masks = os.path.join(data, "gt_masks", split, category, uid)
            audio = os.path.join(data, "audio_wav", split, category, uid + ".wav")
            frame_name = uid + "_{}.png"
            written["s4"].append({"name": uid, "start_time": "0", "category": category, "split": split})
        else:
            data = os.path.join(out, "Multi-sources", "ms3_data")
            frames = os.path.join(data, "visual_frames", uid)
            masks = os.path.join(data, "gt_masks", split, uid)
            audio = os.path.join(data, "audio_wav", split, uid + ".wav")
            frame_name = uid + ".mp4_{}.png"
            written["ms3"].append({"video_id": uid, "split": split})
        for folder in (frames, masks, os.path.dirname(audio)):
            os.makedirs(folder, exist_ok=True)
        for i in range(5):
            Image.open(os.path.join(clip, "frames", f"{i}.jpg")).save(os.path.join(frames, frame_name.format(i + 1)))
            label = os.path.join(clip, "labels_semantic", f"{i}.png")
            if os.path.exists(label):
                binary = (np.array(Image.open(label)) > 0).astype(np.uint8) * 255
                Image.fromarray(binary).save(os.path.join(masks, f"{uid}_{i + 1}.png"))
        shutil.copy(os.path.join(clip, "audio.wav"), audio)
    for key, folder in (("s4", "Single-source"), ("ms3", "Multi-sources")):
        with open(os.path.join(out, folder, f"{key}_meta_data.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(written[key][0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(written[key])
    return written
