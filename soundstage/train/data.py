"""The training data: frames and ground-truth masks from the manifest, cues from the caches.

``AVSClips`` is a torch ``Dataset`` with one item per clip (a manifest row of the chosen
split): the clip's frames as Mask2Former input and its masks, and for every frame the cue of
that frame's second (AVSBench frames are one per second; frame i goes with second i)::

    {"clip_id": str, "frames": int64 [T] (frame indices),
     "pixel_values": float32 [T, 3, S, S], "labels": int64 [T, M, M], "image_hw": int64 [T, 2],
     "audio": float32 [T, D], "active": float32 [T, Q], "text": float32 [T, slots, Dt],
     "text_mask": bool [T, slots], "prior": float32 [T, M, M]}   # cue keys / prior only when configured

The mask prior (``prior``): per frame the ground-truth foreground (``gt``) or the masks stage's
cached probability of the same video frame (``masks``), resized bilinearly to the mask size.

Images are processed as ``Mask2FormerImageProcessor`` does with ``size={"height": S, "width":
S}``: RGB, bilinear resize to S x S, scaled by 1/255 and normalised with the ImageNet mean and
std. Masks come from ``labels_semantic`` (palette index per pixel; the AVSBench-object layout's
binary masks as 0/1), resized to M x M with nearest neighbour. ``task="binary"``: label 1 where
any object sounds, else 0; ``task="semantic"``: the palette index = class id (0 background,
71 classes).

Frames without annotation: AVSBench v1s *train* clips have only frame 0 labelled. The policy
``unlabelled="first"`` (default) trains on the labelled frames only (frame 0 of those clips);
``"repeat"`` uses frame 0's image and mask for every second of the clip, each with its own
second's cue, as the Stepping Stones trainer does.

Cues: a cue with one row fewer than the clip's frames gets its last row repeated (AVSBench's
own VGGish preprocessing pads the 5th second that way); more rows are cut; anything shorter is
an error naming the clip. A clip missing from a cue's cache is an error at construction.

Audio replacement (``audio_variant``) for the sensitivity probes — only the ``audio`` cue
changes, active queries and text cues stay: ``real``; ``muted``: the cue the same audio model
gives for digital silence (``silence`` array, ``[seconds, D]``, see ``soundstage.train.probes``);
``zeroed``: zeros; ``swapped``: the cue of the next clip of the dataset (clip i + 1, cyclic; its
rows cut or cycled to this clip's length); ``noise:SNR_DB``: the real cue plus Gaussian noise
whose power is the cue's mean power / 10^(SNR/10), per clip from a generator seeded by the
clip's position, so every evaluation sees the same noise.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from soundstage.manifests.table import (
    annotated_frames,
    duplicate_ids,
    frame_path,
    label_path,
    mask_kind,
    read_manifest,
)
from soundstage.train.cues import CueError, CueSpec, check_clips

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TASKS = {"binary": 2, "semantic": 71}  # task -> class count (background included)
UNLABELLED_POLICIES = ("first", "repeat")


def parse_variant(variant: str) -> tuple[str, float | None]:
    """``"noise:10"`` -> ("noise", 10.0); the other variants have no argument."""
    name, _, arg = variant.partition(":")
    if name not in ("real", "muted", "zeroed", "swapped", "noise"):
        raise ValueError(f"audio variant {variant!r}: use real, muted, zeroed, swapped or noise:SNR_DB")
    if name == "noise":
        try:
            return name, float(arg)
        except ValueError:
            raise ValueError(f"audio variant {variant!r}: noise needs an SNR in dB, e.g. noise:10") from None
    if arg:
        raise ValueError(f"audio variant {variant!r} takes no argument")
    return name, None


def load_image(path: str, size: int) -> np.ndarray:
    """``[3, S, S]`` float32: the Mask2Former image processor's resize, rescale and normalise."""
    return normalized(resized_frame(path, size)[0])


def resized_frame(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(``[S, S, 3]`` uint8 RGB, (height, width) decoded): the image processor's resize alone, the
    part the ``frames`` stage caches."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        return np.asarray(rgb.resize((size, size), Image.BILINEAR)), (rgb.height, rgb.width)


#: ``(v / 255 - mean) / std`` in float32 for every uint8 value v, per channel ``[3, 256]``: the
#: same float32 operations as on a whole image, so looking values up gives the same numbers
NORMALIZED_VALUES = ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).T.copy()


def normalized(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``[S, S, 3]`` uint8 -> ``[3, S, S]`` float32: rescaled by 1/255, ImageNet mean/std
    (into ``out`` when given)."""
    pixels = np.asarray(pixels)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32) if out is None else out
    for c in range(3):
        np.take(NORMALIZED_VALUES[c], pixels[..., c], out=out[c])
    return out


def image_hw(path: str) -> list[int]:
    """The image's original (height, width) (its header only)."""
    with Image.open(path) as im:
        return [im.height, im.width]


def load_label(row: dict, frame: int, manifest_dir: str, size: int, task: str) -> np.ndarray:
    """``[M, M]`` int64 class ids of one annotated frame (see the module docstring)."""
    kind = mask_kind(row)
    with Image.open(label_path(row, frame, manifest_dir, kind)) as im:
        if im.mode not in ("L", "P", "1", "I;16", "I"):
            raise CueError(f"clip {row['clip_id']} frame {frame}: label image mode {im.mode} is not single-channel")
        labels = np.asarray(im.resize((size, size), Image.NEAREST)).astype(np.int64)
    if task == "binary" or kind == "binary":
        return (labels != 0).astype(np.int64)
    return labels


class AVSClips(torch.utils.data.Dataset):
    def __init__(
        self,
        manifest: str,
        split: str | list | None,
        cues: dict,
        image_size: int,
        mask_size: int | None = None,
        task: str = "binary",
        unlabelled: str = "first",
        audio_variant: str = "real",
        silence: np.ndarray | None = None,
        num_queries: int | None = None,
        prior: str | None = None,
        active_encoding=None,
    ):
        """``cues``: role -> (CueSpec, StageReader) (see ``soundstage.train.cues``);
        ``num_queries``: the model's, for active query ids; ``prior``: each frame's mask prior
        from ``gt`` (its ground-truth mask) or ``masks`` (the ``prior`` cue), None: no prior;
        ``active_encoding``: (ids ``[T, k]``, -1 = none; num_queries) -> weights ``[T, Q]``, the
        recipe's (default: multi-hot)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        if unlabelled not in UNLABELLED_POLICIES:
            raise ValueError(f"unlabelled-frame policy must be one of {UNLABELLED_POLICIES}, not {unlabelled!r}")
        self.variant, self.snr_db = parse_variant(audio_variant)
        if self.variant == "muted" and silence is None:
            raise ValueError("the muted variant needs the silence cue (soundstage.train.probes.silence_cue)")
        if self.variant != "real" and "audio" not in cues:
            raise ValueError(f"audio variant {audio_variant!r} needs an audio cue")
        df = read_manifest(manifest)
        repeated = duplicate_ids(df, manifest)
        if repeated:
            raise CueError(repeated)
        if "problem" in df.columns:
            bad = df[df["problem"] != ""]
            if len(bad):
                row = bad.iloc[0]
                raise CueError(
                    f"manifest {manifest}: {len(bad)} clip(s) with problems, e.g. {row['clip_id']}: "
                    f"{row['problem']} (fix or remove them)"
                )
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            df = df[df["split"].isin(splits)]
            if df.empty:
                raise CueError(f"manifest {manifest} has no clips of split {', '.join(splits)}")
        self.manifest_dir = os.path.dirname(os.path.abspath(manifest))
        self.rows = df.to_dict("records")
        self.clip_ids = [r["clip_id"] for r in self.rows]
        self.cues = cues
        if prior not in (None, "gt", "masks") or (prior == "masks" and "prior" not in cues):
            raise ValueError(f"prior {prior!r}: use gt, or masks with a prior cue")
        self.prior = prior
        for role, (spec, reader) in cues.items():
            if role != "prior" or prior == "masks":
                check_clips(reader, self.clip_ids, f"{role} cue {spec.stage}:{spec.field}")
        self.image_size, self.mask_size = image_size, mask_size or image_size
        self.task, self.unlabelled = task, unlabelled
        self.silence = silence
        self.num_queries = num_queries
        self.active_encoding = active_encoding
        self.frames = None  # a frames-stage reader (use_frames), else frames are decoded per item

    def use_frames(self, reader, required: bool) -> bool:
        """Read images from a ``frames`` stage output (``pixels`` resized to the image size) instead
        of decoding the JPEGs; the tensors are the same. Only when it holds every clip: otherwise
        an error if ``required``, else frames stay decoded. Returns whether it is used."""
        size = reader.meta["params"]["size"]
        if size != self.image_size:
            raise CueError(f"the frames output {reader.dir.path} is at size {size}, the model's input is {self.image_size}")
        missing = [cid for cid in self.clip_ids if cid not in reader]
        if missing and required:
            raise CueError(
                f"{len(missing)} clip(s) are not in the frames output {reader.dir.path}, e.g. {missing[:3]} "
                "(run the frames stage on the manifest, or train with frames: auto / decode)"
            )
        self.frames = None if missing else reader
        return self.frames is not None

    def __len__(self) -> int:
        return len(self.rows)

    def frame_plan(self, row: dict) -> tuple[list[int], list[int]]:
        """(image/mask frame, cue second) pairs of a clip, by the unlabelled-frame policy."""
        labelled = annotated_frames(row)
        seconds = int(row["num_frames"])
        if not labelled:
            raise CueError(f"clip {row['clip_id']} has no annotated frame")
        if len(labelled) == seconds or self.unlabelled == "first":
            return labelled, labelled
        return [labelled[0]] * seconds, list(range(seconds))

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        frames, seconds = self.frame_plan(row)
        labels = {f: load_label(row, f, self.manifest_dir, self.mask_size, self.task) for f in set(frames)}
        sizes = {f: image_hw(frame_path(row, f, self.manifest_dir)) for f in set(frames)}
        item = {
            "clip_id": row["clip_id"],
            "frames": torch.tensor(frames, dtype=torch.int64),
            "pixel_values": torch.from_numpy(self._pixel_values(row, frames)),
            "labels": torch.from_numpy(np.stack([labels[f] for f in frames])),
            "image_hw": torch.tensor([sizes[f] for f in frames], dtype=torch.int64),
        }
        if self.prior:
            item["prior"] = torch.from_numpy(self._prior(row, frames, item["labels"]))
        need = int(row["num_frames"])
        for role, (spec, reader) in self.cues.items():
            if role == "prior":
                continue
            values = reader[row["clip_id"]]
            cue = values[spec.field]
            if spec.lengths_field:  # one list per frame, concatenated: pad to [T, longest] with -1
                cue = padded_lists(cue, values[spec.lengths_field])
            cue = self._rows(cue, need, row["clip_id"], spec)
            if role == "audio":
                cue = self._audio_variant(cue, index, need)
            if role == "active":
                cue = self._active_weights(cue, row["clip_id"])
            item[role] = torch.from_numpy(np.ascontiguousarray(cue[seconds], dtype=np.float32))
            if spec.mask_field:
                mask = self._rows(values[spec.mask_field], need, row["clip_id"], spec)
                item[f"{role}_mask"] = torch.from_numpy(np.ascontiguousarray(mask[seconds]).astype(bool))
        return item

    def _pixel_values(self, row: dict, frames: list[int]) -> np.ndarray:
        """``[T, 3, S, S]`` float32 of ``frames`` (a frame repeated is computed once), from the
        frames cache or decoded."""
        out = np.empty((len(frames), 3, self.image_size, self.image_size), dtype=np.float32)
        pixels = self.frames[row["clip_id"]]["pixels"] if self.frames is not None else None
        first = {}
        for k, f in enumerate(frames):
            if f in first:
                out[k] = out[first[f]]
            elif pixels is not None:
                normalized(pixels[f], out=out[k])
            else:
                out[k] = load_image(frame_path(row, f, self.manifest_dir), self.image_size)
            first.setdefault(f, k)
        return out

    def _prior(self, row: dict, frames: list[int], labels: torch.Tensor) -> np.ndarray:
        """``[T, M, M]`` float32 in [0, 1]: the ground-truth foreground, or the cached masks of
        the same frames (p = stored / 255) bilinearly resized to the mask size."""
        if self.prior == "gt":
            return (labels != 0).numpy().astype(np.float32)
        spec, reader = self.cues["prior"]
        probs = np.asarray(reader[row["clip_id"]][spec.field])
        if max(frames) >= len(probs):
            raise CueError(
                f"clip {row['clip_id']}: the {spec.stage} prior has {len(probs)} frames, frame {max(frames)} is needed"
            )
        maps = torch.from_numpy(probs[frames].astype(np.float32) / 255.0)[:, None]
        size = (self.mask_size, self.mask_size)
        if tuple(maps.shape[-2:]) != size:
            maps = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps[:, 0].numpy()

    @staticmethod
    def _rows(values: np.ndarray, need: int, clip_id: str, spec: CueSpec) -> np.ndarray:
        values = np.asarray(values)
        if len(values) >= need:
            return values[:need]
        if len(values) == need - 1 and len(values) > 0:
            return np.concatenate([values, values[-1:]])
        raise CueError(f"clip {clip_id}: {spec.stage}:{spec.field} has {len(values)} rows for {need} frames")

    def _audio_variant(self, cue: np.ndarray, index: int, need: int) -> np.ndarray:
        cue = cue.astype(np.float32)
        if self.variant == "real":
            return cue
        if self.variant == "zeroed":
            return np.zeros_like(cue)
        if self.variant == "muted":
            if len(self.silence) < need:
                raise CueError(f"silence cue has {len(self.silence)} rows for {need} frames")
            return np.asarray(self.silence[:need], dtype=np.float32)
        if self.variant == "swapped":
            spec, reader = self.cues["audio"]
            other = self.rows[(index + 1) % len(self.rows)]
            values = np.asarray(reader[other["clip_id"]][spec.field], dtype=np.float32)
            return values[np.arange(need) % len(values)]
        rng = np.random.default_rng([index, round(self.snr_db * 1000) & 0xFFFFFFFF])
        noise_power = float(np.mean(cue**2)) / 10 ** (self.snr_db / 10)
        return cue + rng.standard_normal(cue.shape).astype(np.float32) * np.float32(np.sqrt(noise_power))

    def _active_weights(self, cue: np.ndarray, clip_id: str) -> np.ndarray:
        return active_weights(cue, clip_id, self.num_queries, self.active_encoding)


def active_weights(cue: np.ndarray, clip_id: str, num_queries: int, encoding=None) -> np.ndarray:
    """Query ids ``[T, k]`` (-1 = none) -> multi-hot ``[T, Q]`` (or ``encoding(ids, num_queries)``);
    float weights pass through."""
    if np.issubdtype(cue.dtype, np.floating):
        return cue
    if cue.max(initial=-1) >= num_queries:
        raise CueError(
            f"clip {clip_id}: active query id {int(cue.max())} is outside the model's "
            f"{num_queries} queries (ids must lie in [0, {num_queries}))"
        )
    ids = cue.reshape(len(cue), -1)
    if encoding is not None:
        return encoding(ids, num_queries)
    weights = np.zeros((len(cue), num_queries), dtype=np.float32)
    rows, cols = np.nonzero(ids >= 0)
    weights[rows, ids[rows, cols]] = 1.0
    return weights


def padded_lists(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated per-frame lists -> ``[frames, longest]`` with -1 after each list's end."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.full((len(lengths), max(int(lengths.max(initial=0)), 1)), -1, dtype=np.int64)
    for i, chunk in enumerate(np.split(np.asarray(values), np.cumsum(lengths)[:-1])):
        out[i, : len(chunk)] = chunk
    return out


def collate_frames(items: list[dict]) -> dict:
    """A batch of clips as one batch of frames: tensors concatenated along frames, plus
    ``clip_ids`` and ``clip_index [N]`` (which clip each frame belongs to)."""
    batch = {
        "clip_ids": [it["clip_id"] for it in items],
        "clip_index": torch.cat([torch.full((len(it["frames"]),), i) for i, it in enumerate(items)]),
    }
    for key in items[0]:
        if key == "clip_id":
            continue
        batch[key] = torch.cat([it[key] for it in items])
    return batch


def frame_clip_ids(batch: dict) -> list[str]:
    """The clip id of each frame of a ``collate_frames`` batch."""
    return [batch["clip_ids"][i] for i in batch["clip_index"].tolist()]
