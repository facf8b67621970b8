"""A small synthetic dataset in the exact AVSBench (unified release) layout.

It is the toolkit's embedded default input and the fixture of its tests::

    OUT/metadata.csv            vid,uid,s_min,s_sec,a_obj,split,label
    OUT/label2idx.json          the real 71 classes, 1-based, background = 1
    OUT/<v1s|v1m|v2>/<uid>/frames/{i}.jpg
                          labels_rgb/{i}.png        palette colours of the sounding objects
                          labels_semantic/{i}.png   palette index per pixel (one channel)
                          audio.wav
    OUT/synthetic_truth.json    what the generator drew and played (for tests and demos)
    OUT/manifest.csv            built by the normal AVSBench manifest builder, relative paths

Each of eight real AVSBench classes has its own shape, colour and sound. Clips show two or
three objects (of different classes); per second each object is sounding or silent, its sound
plays exactly in the seconds it sounds and only sounding objects are in that frame's masks.
Every v1s frame shows a silent object beside the sounding one, and some v1m/v2 seconds are
silent altogether (empty masks), so only the audio says which objects to segment. Audio comes
as 16 kHz mono, 44.1 kHz stereo (objects panned by position) or 48 kHz mono. v1s/v1m clips have 5
frames (224x224), v2 clips 10 (256x144); v1s train clips are labelled on frame 0 only.
Same seed, same clip count -> the same bytes in every file.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import string

import numpy as np
import soundfile as sf
from PIL import Image

from soundstage.manifests.avsbench import FRAMES_PER_SUBSET, SPLITS, SUBSETS, annotated_frame_indices, build_avsbench_manifest
from soundstage.manifests.palette import class_index, index_to_colour, label2idx
from soundstage.manifests.table import relative_paths, write_manifest

GENERATOR_VERSION = 3  # 2: v1m clips have vid == uid, as in the real release; 3: silent seconds in v1m/v2, 2-3 objects
#: A count for tests: every (subset, split) pair, two clips per train pair, generated in about a second.
TEST_CLIPS = 12
MARKER = "SYNTHETIC.json"
# What the generator owns in OUT; only these are replaced when it runs again.
OWNED = ("metadata.csv", "label2idx.json", *SUBSETS, "manifest.csv", "synthetic_truth.json", MARKER)

#: class -> (shape, colour in the frames, sound). Colours are not palette colours on purpose.
#: The sounds occupy separate bands (car 60-150 Hz, guitar 196 Hz and harmonics, helicopter
#: 300 Hz, violin 440 Hz, piano 523 Hz, clock 1.5 kHz, bird 2-4 kHz, vacuum 5-7 kHz), so which
#: sources sound in a second can be read off its spectrum.
CLASSES = {
    "bird": ("triangle", (235, 200, 40), "chirp"),
    "car": ("rectangle", (40, 90, 215), "low noise band"),
    "clock": ("ring", (235, 235, 235), "ticks"),
    "guitar": ("ellipse", (205, 115, 40), "harmonic stack"),
    "helicopter": ("cross", (60, 165, 75), "AM tone"),
    "piano": ("square", (25, 25, 30), "pure tone"),
    "vacuum-cleaner": ("diamond", (175, 60, 195), "high noise band"),
    "violin": ("disc", (150, 30, 35), "vibrato tone"),
}
FRAME_SIZE = {"v1s": (224, 224), "v1m": (224, 224), "v2": (256, 144)}  # (width, height)
AUDIO_FORMATS = ((16000, 1), (44100, 2), (48000, 1))  # (sample rate, channels), cycled per clip
SUBSET_WEIGHTS = {"v1s": 0.4, "v1m": 0.2, "v2": 0.4}
SPLIT_WEIGHTS = {"train": 0.6, "val": 0.2, "test": 0.2}
YT_ALPHABET = string.ascii_letters + string.digits + "-_"
SOUND_LEVEL = 0.2
#: v1m/v2: the chance that an object sounds in a given second; a second is silent for one object
#: 55% of the time, for two 30%, for three 17%
SOUNDING = 0.45
FADE_SECONDS = 0.01  # gate ramps, so switching a source on or off does not click


# ---------------------------------------------------------------- sounds


def _band_noise(rng, n: int, sr: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spectrum[(freqs < low) | (freqs > high)] = 0
    wave = np.fft.irfft(spectrum, n)
    return wave / (np.abs(wave).max() + 1e-9)


def class_sound(name: str, seconds: int, sr: int, rng) -> np.ndarray:
    """The class's sound for ``seconds`` at ``sr``, peak about 1.

    Every sound repeats exactly once per second (integer frequencies and rates), so one second
    is synthesised and tiled.
    """
    return np.tile(_one_second(name, sr, rng), seconds)


def _one_second(name: str, sr: int, rng) -> np.ndarray:
    t = np.arange(sr) / sr
    kind = CLASSES[name][2]
    if kind == "pure tone":
        return np.sin(2 * np.pi * 523.0 * t)
    if kind == "harmonic stack":  # sin(k x) for k = 1..6 by the Chebyshev recurrence: one sin, one cos
        x = 2 * np.pi * 196.0 * t
        two_cos, previous, current = 2 * np.cos(x), np.zeros_like(x), np.sin(x)
        total = current.copy()
        for k in range(2, 7):
            previous, current = current, two_cos * current - previous
            total += current / k
        return total / 2.45
    if kind == "vibrato tone":
        phase = 2 * np.pi * (440.0 * t - (12.0 / (2 * np.pi * 6.0)) * np.cos(2 * np.pi * 6.0 * t))
        return 0.7 * np.sin(phase) + 0.3 * np.sin(2 * phase)
    if kind == "chirp":  # four upward sweeps 2 -> 4 kHz per second
        tau = t % 0.25
        return np.sin(2 * np.pi * (2000.0 * tau + (2000.0 / 0.25) * tau**2 / 2)) * (tau < 0.2)
    if kind == "AM tone":
        return np.sin(2 * np.pi * 300.0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 15.0 * t))
    if kind == "ticks":  # eight 25 ms 1.5 kHz pips per second (smooth envelope: no broadband click)
        tau = t % 0.125
        return np.sin(2 * np.pi * 1500.0 * tau) * np.sin(np.pi * np.minimum(tau / 0.025, 1.0)) ** 2
    if kind == "low noise band":
        return _band_noise(rng, len(t), sr, 60.0, 150.0)
    if kind == "high noise band":
        return _band_noise(rng, len(t), sr, 5000.0, 7000.0)
    raise ValueError(f"no sound for {name}")


def _gate(sounding: list[bool], sr: int) -> np.ndarray:
    """1 in the seconds a source sounds, 0 elsewhere, with a short linear ramp at each change."""
    gate = np.repeat(np.asarray(sounding, dtype=np.float32), sr)
    half = max(1, int(FADE_SECONDS * sr) // 2)
    ramp = np.linspace(0.0, 1.0, 2 * half, dtype=np.float32)
    for second in range(1, len(sounding)):
        if sounding[second] != sounding[second - 1]:
            gate[second * sr - half : second * sr + half] = ramp if sounding[second] else ramp[::-1]
    return gate


def render_audio(objects: list[dict], seconds: int, sr: int, channels: int, width: int, rng) -> np.ndarray:
    """``[samples, channels]`` float32 mix: each object's sound gated by its per-second schedule."""
    # no noise floor: a second in which nothing sounds is digital silence, the same input as the
    # training stage's "muted" probe, so a model answers the probe as it answers silent seconds
    mix = np.zeros((seconds * sr, channels), dtype=np.float32)
    for obj in objects:
        wave = (SOUND_LEVEL * class_sound(obj["class"], seconds, sr, rng)).astype(np.float32) * _gate(obj["sounding"], sr)
        if channels == 2:  # constant-power pan from the object's mean horizontal position
            angle = np.mean([c[0] for c in obj["centres"]]) / width * (np.pi / 2)
            mix += wave[:, None] * np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)
        else:
            mix[:, 0] += wave
    return np.clip(mix, -1.0, 1.0)


# ---------------------------------------------------------------- pictures


def shape_mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        return (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "rectangle":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.55 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.6 * r)) ** 2 <= 1
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape}")


def render_frame(objects, frame: int, width: int, height: int, background: np.ndarray, rng):
    """(RGB frame, palette-index map of the sounding objects) for frame ``frame``."""
    image = background + rng.integers(-7, 8, background.shape, dtype=np.int16)  # sensor-like grain
    labels = np.zeros((height, width), dtype=np.uint8)
    for obj in objects:
        shape, colour, _ = CLASSES[obj["class"]]
        (cx, cy), r = obj["centres"][frame], obj["radius"]
        # Only the object's bounding box is evaluated: every shape lies within r of its centre.
        x0, x1 = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
        y0, y1 = max(0, int(cy - r) - 1), min(height, int(cy + r) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        mask = shape_mask(shape, cx, cy, r, xx, yy)
        image[y0:y1, x0:x1][mask] = colour
        if obj["sounding"][frame]:
            labels[y0:y1, x0:x1][mask] = class_index(obj["class"])
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _background(width: int, height: int, rng) -> np.ndarray:
    """A smooth gradient between two muted colours (int16, ``[H, W, 3]``)."""
    start, end = rng.uniform(60, 190, 3), rng.uniform(60, 190, 3)
    ramp = np.linspace(0, 1, width)[None, :, None] * 0.7 + np.linspace(0, 1, height)[:, None, None] * 0.3
    return np.rint(start + (end - start) * ramp).astype(np.int16)


# ---------------------------------------------------------------- planning clips


def _allocate(clips: int) -> list[tuple[str, str]]:
    """(subset, split) per clip: every one of the 9 pairs once (when clips >= 9), the rest by
    weight (largest remainder)."""
    pairs = [(subset, split) for split in SPLITS for subset in SUBSETS]
    if clips <= len(pairs):
        return pairs[:clips]
    rest = clips - len(pairs)
    shares = {p: rest * SUBSET_WEIGHTS[p[0]] * SPLIT_WEIGHTS[p[1]] for p in pairs}
    counts = {p: int(s) for p, s in shares.items()}
    by_remainder = sorted(pairs, key=lambda p: -(shares[p] - counts[p]))
    for p in by_remainder[: rest - sum(counts.values())]:
        counts[p] += 1
    return [p for p in pairs for _ in range(1 + counts[p])]


def _ytid(rng) -> str:
    return "".join(YT_ALPHABET[i] for i in rng.integers(0, len(YT_ALPHABET), 11))


def _identities(plan: list[tuple[str, str]], rng) -> list[dict]:
    """vid, uid, s_min, s_sec per clip, as the real release has them: v1 uids ``<ytid>_<n>`` with
    vid ``<ytid>`` for v1s and ``vid == uid`` for v1m; v2 uids ``<ytid>_<startms>_<endms>`` with two
    or three consecutive v2 clips of a split cut from one video (sharing its vid)."""
    ids, shared = [], None  # shared: (subset, split, ytid, next start second, clips left)
    for subset, split in plan:
        seconds = FRAMES_PER_SUBSET[subset]
        if subset == "v2":
            if not shared or shared[:2] != (subset, split) or shared[4] == 0:
                shared = (subset, split, _ytid(rng), int(rng.integers(0, 120)), int(rng.integers(2, 4)))
            _, _, vid, start, left = shared
            shared = (subset, split, vid, start + seconds, left - 1)
            uid = f"{vid}_{start * 1000}_{(start + seconds) * 1000}"
        else:
            vid, start = _ytid(rng), int(rng.integers(0, 300))
            uid = f"{vid}_{int(rng.integers(1, 6))}"
            vid = uid if subset == "v1m" else vid
        ids.append({"vid": vid, "uid": uid, "s_min": start // 60, "s_sec": start % 60})
    return ids


def _schedules(subset: str, n_objects: int, seconds: int, rng) -> list[list[bool]]:
    """Per object, sounding or not per second. v1s: the first object sounds throughout, others
    never. v1m/v2: each object sounds in a second with probability SOUNDING, independently, so some
    seconds are silent (as some real v2 frames are: their masks are empty, and a model that
    listens must hear it); every object sounds at least once unless it is a distractor (the
    last of three, in half the clips)."""
    if subset == "v1s":
        return [[True] * seconds] + [[False] * seconds for _ in range(n_objects - 1)]
    while True:
        table = rng.random((n_objects, seconds)) < SOUNDING
        if n_objects == 3 and rng.random() < 0.5:
            table[2] = False
        if table[: 2 if n_objects == 3 else n_objects].any(axis=1).all():
            return table.tolist()


def _objects(subset: str, width: int, height: int, rng) -> list[dict]:
    seconds = FRAMES_PER_SUBSET[subset]
    n_objects = int(rng.integers(2, 4))
    classes = rng.choice(sorted(CLASSES), n_objects, replace=False)
    cells = rng.choice(9, n_objects, replace=False)  # a 3x3 grid keeps objects apart
    cell_w, cell_h = width / 3, height / 3
    schedules = _schedules(subset, n_objects, seconds, rng)
    objects = []
    for name, cell, sounding in zip(classes, cells, schedules):
        radius = 0.4 * min(cell_w, cell_h) * rng.uniform(0.75, 1.0)
        x0, y0 = (cell % 3 + 0.5) * cell_w, (cell // 3 + 0.5) * cell_h
        vx, vy = rng.uniform(-0.8, 0.8, 2)  # a slow drift, well inside its cell
        centres = [[round(x0 + vx * k, 2), round(y0 + vy * k, 2)] for k in range(seconds)]
        objects.append({"class": str(name), "radius": round(radius, 2), "centres": centres, "sounding": sounding})
    return objects


# ---------------------------------------------------------------- writing


def _write_clip(clip_dir: str, subset: str, split: str, objects, index: int, rng) -> dict:
    width, height = FRAME_SIZE[subset]
    seconds = FRAMES_PER_SUBSET[subset]
    annotated = annotated_frame_indices(subset, split)
    for folder in ("frames", "labels_rgb", "labels_semantic"):
        os.makedirs(os.path.join(clip_dir, folder))
    background = _background(width, height, rng)
    for frame in range(seconds):
        image, labels = render_frame(objects, frame, width, height, background, rng)
        Image.fromarray(image).save(os.path.join(clip_dir, "frames", f"{frame}.jpg"), quality=90)
        if frame in annotated:
            Image.fromarray(index_to_colour(labels)).save(os.path.join(clip_dir, "labels_rgb", f"{frame}.png"))
            Image.fromarray(labels, mode="L").save(os.path.join(clip_dir, "labels_semantic", f"{frame}.png"))
    sr, channels = AUDIO_FORMATS[index % len(AUDIO_FORMATS)]
    audio = render_audio(objects, seconds, sr, channels, width, rng)
    sf.write(os.path.join(clip_dir, "audio.wav"), audio, sr, subtype="PCM_16")
    return {"sample_rate": sr, "channels": channels, "width": width, "height": height}


def _prepare(out_dir: str) -> None:
    """Make ``out_dir`` ready: new, empty, or an earlier synthetic dataset (whose own entries are
    replaced). Anything else is refused rather than mixed with generated clips."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, MARKER)):
            raise FileExistsError(f"{out_dir} is not empty and holds no synthetic dataset; choose an empty folder")
        for entry in OWNED:
            path = os.path.join(out_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def make_synthetic_dataset(out_dir: str, clips: int = 100, seed: int = 0, workers: int = 4) -> str:
    """Write the dataset into ``out_dir`` and return the path of its manifest (``manifest.csv``)."""
    if clips < 1:
        raise ValueError("clips must be at least 1")
    _prepare(out_dir)
    # The marker comes first, so a folder left by an interrupted run is still recognised as ours.
    _write_json(os.path.join(out_dir, MARKER), {"generator_version": GENERATOR_VERSION, "clips": clips, "seed": seed})
    rng = np.random.default_rng(seed)
    plan = _allocate(clips)
    identities = _identities(plan, rng)
    truth, rows = {}, []
    for index, ((subset, split), ident) in enumerate(zip(plan, identities)):
        clip_rng = np.random.default_rng([seed, index])  # per clip: a clip does not depend on the others
        width, height = FRAME_SIZE[subset]
        objects = _objects(subset, width, height, clip_rng)
        audio = _write_clip(os.path.join(out_dir, subset, ident["uid"]), subset, split, objects, index, clip_rng)
        sounding = [o["class"] for o in objects if any(o["sounding"])]
        rows.append([ident["vid"], ident["uid"], ident["s_min"], ident["s_sec"], "_".join(sounding), split, subset])
        truth[ident["uid"]] = {"subset": subset, "split": split, **audio, "objects": objects}

    with open(os.path.join(out_dir, "metadata.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
        writer.writerows(rows)
    _write_json(os.path.join(out_dir, "label2idx.json"), label2idx())
    _write_json(
        os.path.join(out_dir, "synthetic_truth.json"), {"classes": {k: list(v) for k, v in CLASSES.items()}, "clips": truth}
    )

    result = build_avsbench_manifest(out_dir, workers=workers)
    bad = result.manifest[result.manifest["problem"] != ""]
    if len(bad):  # the generator's own output must be clean; anything else is a bug here
        raise RuntimeError(f"synthetic dataset has problems: {bad[['clip_id', 'problem']].values.tolist()[:3]}")
    manifest_path = os.path.join(out_dir, "manifest.csv")
    write_manifest(relative_paths(result.manifest, out_dir), manifest_path)
    return manifest_path


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=False)
        f.write("\n")
