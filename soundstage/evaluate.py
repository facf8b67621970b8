"""``soundstage evaluate``: score predicted masks against a manifest's ground truth by every
named protocol of ``soundstage.metrics``.

Predictions (``--pred DIR``) use the Stepping Stones layout ``DIR/<subset>/<clip_id>/<i>.png``
(``<subset>`` = v1s / v1m / v2, ``<i>`` = 0-based frame index), or ``<i>.npy``:

- PNG, single channel: 0/255 (or 0/1) = a binary mask; any other values = a probability map
  p = value / 255 (``--png labels`` reads them as class indices instead; RGB PNGs are read as
  AVSBench palette colours and always give class indices).
- ``.npy``: ``[H, W]`` float = foreground scores (``--scores probabilities|logits``);
  ``[2, H, W]`` = two-channel logits (background, sounding) as Stepping Stones outputs;
  ``[C, H, W]`` with C > 2 = per-class logits; integer ``[H, W]`` = class indices.

Only annotated frames are scored; a missing prediction is an error that names it.

Protocol options (``--batch-size``, ``--frames-per-video``, ``--threshold``, ``--aggregation``,
``--option key=value``) change how a protocol scores; with ``--protocol all`` each applies to the
protocols that have it. Every number is printed with its aggregation (the whole set as one
batch, per video, or per batch of N videos): the same predictions give different numbers under
different aggregations. ``--aggregation paper`` is each protocol's published one (AVSBench
S4/MS3: batches of 4 videos, as its test script ran).
"""

from __future__ import annotations

import json
import os

import click
import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from soundstage.cache.reader import MissingClip
from soundstage.manifests import (
    annotated_frames,
    duplicate_ids,
    good_clips,
    label_path,
    mask_kind,
    read_manifest,
)
from soundstage.manifests.palette import NUM_CLASSES, colour_to_index
from soundstage.metrics import PROTOCOLS, Accumulator
from soundstage.metrics.inputs import MetricInputError, resize_labels, resize_scores
from soundstage.metrics.protocols import COMMON_OPTIONS
from soundstage.pipeline.pipeline_file import PipelineError
from soundstage.train.config import ConfigError
from soundstage.train.cues import CueError
from soundstage.train.data import parse_variant
from soundstage.train.evaluation import run_protocols
from soundstage.train.run_eval import checkpoint_table, evaluate_checkpoint, evaluate_saved_run, load_run

MISSING_SHOWN = 10


def read_prediction(path: str, png: str, scores: str) -> tuple[np.ndarray, str]:
    """``(array, kind)`` with kind in mask / probabilities / logits / two-channel / class-logits / labels.
    A file that cannot be read as such is a ``click.ClickException`` naming it."""
    try:
        return _read_prediction(path, png, scores)
    except UnidentifiedImageError:
        raise click.ClickException(f"{path}: not an image (its bytes are no image format PIL knows)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's and numpy's ways of saying "damaged"
        what = "a .npy array" if path.endswith(".npy") else "an image"
        raise click.ClickException(f"{path}: not readable as {what} ({type(e).__name__}: {e})") from None


def _read_prediction(path: str, png: str, scores: str) -> tuple[np.ndarray, str]:
    if path.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
        if array.ndim == 3:
            return array.astype(np.float32), ("two-channel" if array.shape[0] == 2 else "class-logits")
        if not np.issubdtype(array.dtype, np.floating):
            return array.astype(np.int64), "labels"
        return array.astype(np.float32), scores
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB") if image.mode in ("RGB", "RGBA") else image)
    if array.ndim == 3:
        return colour_to_index(array).astype(np.int64), "labels"
    if png == "labels":
        return array.astype(np.int64), "labels"
    values = np.unique(array)
    if np.isin(values, (0, 255)).all() or np.isin(values, (0, 1)).all():
        return (array > 0).astype(np.uint8), "mask"
    return array.astype(np.float32) / 255.0, "probabilities"


def check_sizes(paths: list[str], predictions: list[np.ndarray], truth_size) -> None:
    """The frames of one clip are predicted at one size (any size: they are resized to the
    protocol's); a frame that differs is named, with its size and the others'."""
    sizes = [tuple(a.shape[-2:]) for a in predictions]
    usual = max(set(sizes), key=sizes.count)
    for path, size in zip(paths, sizes):
        if size != usual:
            raise click.ClickException(
                f"{path}: {size[1]}x{size[0]} pixels, but the clip's other predictions are {usual[1]}x{usual[0]} "
                f"(ground truth {truth_size[1]}x{truth_size[0]}); write every frame of a clip at one size"
            )


def read_truth(path: str, kind: str) -> np.ndarray:
    """Class indices (semantic labels) or 0/1 (binary masks) of one annotated frame."""
    array = np.asarray(Image.open(path))
    if array.ndim == 3:
        array = colour_to_index(array[..., :3])
    return (array > 0).astype(np.int64) if kind == "binary" else array.astype(np.int64)


def prediction_path(pred_dir: str, row, i: int) -> str | None:
    base = os.path.join(pred_dir, str(row["subset"]), str(row["clip_id"]), str(i))
    for ext in (".png", ".npy"):
        if os.path.isfile(base + ext):
            return base + ext
    return None


def _size(name: str, eval_size: str, native: tuple[int, int]) -> tuple[int, int]:
    if eval_size == "native":
        return native
    if eval_size == "paper":
        side = PROTOCOLS[name].paper_eval_size
        return native if side is None else (side, side)
    return (int(eval_size), int(eval_size))


def protocol_inputs(name: str, pred: np.ndarray, kind: str, truth: np.ndarray, size) -> tuple | str:
    """``(pred tensor, gt tensor, pred_kind, extra options)`` for one protocol, or why it cannot
    be computed from these predictions."""
    proto = PROTOCOLS[name]
    frames = torch.from_numpy(pred)
    semantic_pred = kind in ("labels", "class-logits")
    if proto.kind == "semantic" and not semantic_pred:
        return "needs class predictions (class-index PNGs or per-class logits)"
    if proto.kind in ("binary", "null") and semantic_pred:  # foreground = any class but background
        if kind == "class-logits":
            frames = frames.argmax(1)
        frames, kind, semantic_pred = (frames > 0).to(torch.uint8), "mask", False
    if kind == "two-channel" and not (proto.kind == "binary" and proto.defaults["two_channel"]):
        frames, kind = frames[:, 1] - frames[:, 0], "logits"  # p(sounding) = sigmoid(l1 − l0)
    if kind in ("mask", "labels"):
        frames = resize_labels(frames, size)
    else:
        frames = resize_scores(frames, size)
    gt = resize_labels(torch.from_numpy(truth), size)
    if proto.kind in ("binary", "null") or (proto.kind == "confusion" and not semantic_pred):
        gt = (gt > 0).long()
    pred_kind = {"two-channel": "logits", "class-logits": "logits"}.get(kind, kind)
    options = {}
    if proto.kind in ("semantic", "confusion"):
        options["num_classes"] = NUM_CLASSES if semantic_pred else 2
    return frames, gt, pred_kind, options


def protocol_options(names: list[str], given: dict) -> dict[str, dict]:
    """name -> the options of ``given`` that protocol has (all of them must fit a single named
    protocol; with several, each option must fit at least one)."""
    chosen = {}
    for name in names:
        proto = PROTOCOLS[name]
        accepted = set(proto.defaults) | (set(COMMON_OPTIONS) - {"aggregation", "eval_size", "pred_kind"})
        if "batch_size" in proto.defaults:
            accepted.add("aggregation")
        chosen[name] = {k: v for k, v in given.items() if k in accepted}
    for key in given:
        if not any(key in options for options in chosen.values()):
            which = names[0] if len(names) == 1 else "any of the protocols"
            raise click.ClickException(f"protocol option {key}: not an option of {which}")
    return chosen


def parse_options(batch_size, frames_per_video, threshold, aggregation, pairs) -> dict:
    """The protocol options given on the command line (``--option key=value``: YAML values)."""
    given = {"batch_size": batch_size, "frames_per_video": frames_per_video, "threshold": threshold}
    given = {k: v for k, v in given.items() if v is not None}
    if aggregation:
        given["aggregation"] = aggregation
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.ClickException(f"--option {pair!r}: write key=value, e.g. --option beta2=0.3")
        given[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return given


def evaluate_prediction_dir(
    pred_dir: str,
    manifest_path: str,
    names: list[str],
    split: str | None,
    subsets: tuple[str, ...],
    png: str = "auto",
    scores: str = "probabilities",
    eval_size: str = "paper",
    options: dict | None = None,
) -> dict[str, dict]:
    """Every protocol in ``names`` over the annotated frames of the manifest's clips
    (``options``: name -> that protocol's options, see ``protocol_options``)."""
    manifest = read_manifest(manifest_path)
    repeated = duplicate_ids(manifest, manifest_path)
    if repeated:
        raise click.ClickException(repeated)
    manifest_dir = os.path.dirname(os.path.abspath(manifest_path))
    rows = good_clips(manifest)
    if split:
        rows = rows[rows["split"] == split]
    if subsets:
        rows = rows[rows["subset"].isin(subsets)]
    if rows.empty:
        raise click.ClickException(f"{manifest_path}: no usable clips with split={split} subsets={','.join(subsets) or 'all'}")
    plan, missing = [], []
    for _, row in rows.iterrows():
        frames = annotated_frames(row)
        paths = [prediction_path(pred_dir, row, i) for i in frames]
        missing += [f"{row['subset']}/{row['clip_id']}/{i}" for i, p in zip(frames, paths) if p is None]
        plan.append((row, frames, paths))
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (
            f" (+{len(missing) - MISSING_SHOWN} more)" if len(missing) > MISSING_SHOWN else ""
        )
        raise click.ClickException(f"{len(missing)} predictions missing under {pred_dir} (.png or .npy): {shown}")

    accumulators: dict[str, Accumulator] = {}
    unavailable: dict[str, str] = {}
    for row, frames, paths in plan:
        kind = mask_kind(row)
        truth = np.stack([read_truth(label_path(row, i, manifest_dir, kind), kind) for i in frames])
        loaded = [read_prediction(p, png, scores) for p in paths]
        check_sizes(paths, [a for a, _ in loaded], truth.shape[-2:])
        kinds = sorted({k for _, k in loaded})
        if len(kinds) > 1:
            raise click.ClickException(f"{os.path.dirname(paths[0])}: frames mix prediction kinds ({', '.join(kinds)})")
        pred, native = np.stack([a for a, _ in loaded]), tuple(truth.shape[-2:])
        for name in names:
            if name in unavailable:
                continue
            prepared = protocol_inputs(name, pred, kinds[0], truth, _size(name, eval_size, native))
            if isinstance(prepared, str):
                unavailable[name] = prepared
                continue
            frames_t, gt_t, pred_kind, extra = prepared
            if name not in accumulators:
                try:
                    accumulators[name] = Accumulator(name, pred_kind=pred_kind, **extra, **(options or {}).get(name, {}))
                except MetricInputError as e:
                    raise click.ClickException(str(e)) from None
            acc = accumulators[name]
            if acc.options["pred_kind"] != pred_kind:
                raise click.ClickException(
                    f"{os.path.dirname(paths[0])}: {pred_kind} predictions, earlier clips had {acc.options['pred_kind']}"
                )
            acc.update(frames_t, gt_t, videos=[row["clip_id"]] * len(frames))
    results = {}
    for name in names:
        if name in unavailable:
            results[name] = {"protocol": name, "unavailable": unavailable[name], "notes": [unavailable[name]]}
            continue
        result = accumulators[name].compute()
        result["eval_size"] = eval_size if eval_size != "paper" else PROTOCOLS[name].paper_eval_size or "native"
        results[name] = result
    return results


def _number(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def format_table(results: dict[str, dict]) -> str:
    header = f"{'protocol':18s} {'mIoU':>8s} {'F':>8s} {'other':>18s} {'frames':>7s} {'size':>7s}  {'aggregation':44s} notes"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        other = (
            f"null S {r['null_score']:.4f}"
            if "null_score" in r
            else (f"present {r['miou_present']:.4f}" if "miou_present" in r else "")
        )
        lines.append(
            f"{name:18s} {_number(r.get('miou')):>8s} {_number(r.get('fscore')):>8s} {other:>18s} "
            f"{r.get('frames', r.get('pixels', '')) if 'unavailable' not in r else '':>7} "
            f"{r.get('eval_size', '')!s:>7s}  {r.get('aggregation', ''):44s} {'; '.join(r.get('notes', []))}"
        )
    return "\n".join(lines)


@click.command("evaluate")
@click.option(
    "--pred", "pred_dir", type=click.Path(file_okay=False), help="Predicted masks: DIR/<subset>/<clip_id>/<i>.png|.npy."
)
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), help="Manifest with the ground truth.")
@click.option(
    "--protocol",
    "protocol_name",
    default="all",
    show_default=True,
    type=click.Choice([*PROTOCOLS, "all"]),
    help="A protocol, or all of them side by side.",
)
@click.option("--split", default="test", show_default=True, help="Manifest split to score ('' = all).")
@click.option(
    "--subset", "subsets", multiple=True, type=click.Choice(["v1s", "v1m", "v2"]), help="Only these subsets (repeatable)."
)
@click.option(
    "--png",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "labels"]),
    help="auto: 0/255 PNGs are masks, other values probabilities ×255; labels: class indices.",
)
@click.option(
    "--scores",
    default="probabilities",
    show_default=True,
    type=click.Choice(["probabilities", "logits"]),
    help="What float [H, W] .npy predictions hold.",
)
@click.option(
    "--eval-size",
    default="paper",
    show_default=True,
    help="paper: each protocol's size (224 or 256); native: the label size; or a side length.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False),
    help="Instead of --pred: evaluate a training run's model (runs/NAME) on --split.",
)
@click.option(
    "--audio",
    default="real",
    show_default=True,
    help="--run: the audio cue as trained (real), or replaced: muted | zeroed | swapped | noise:SNR_DB.",
)
@click.option("--device", default="auto", show_default=True, help="--run/--recipe: cpu, cuda, ... (auto: cuda when available).")
@click.option(
    "--recipe",
    help="Instead of --pred: score --checkpoint as this recipe's model (bias-in-avs, ...) through the caches: "
    "every protocol side by side (the paper's first), with the real audio and each probe.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    help="--recipe: the weights: a checkpoint the seed code saved (its key layout), a run's checkpoint or model/best, model/last.",
)
@click.option("--cache", type=click.Path(file_okay=False), help="--recipe: the cache with the cues (default: --config's).")
@click.option(
    "--config", "pipeline_file", type=click.Path(exists=True, dir_okay=False), help="--recipe: a pipeline file (manifest, cache)."
)
@click.option("--model", help="--recipe: the Mask2Former base the checkpoint was trained from (default: the tiny stand-in).")
@click.option("--probes", help="--recipe: audio probes, comma-separated (default muted,zeroed,swapped,noise:10; '' for none).")
@click.option(
    "--weights",
    type=click.Choice(["best", "last"]),
    help="--run: model/best (the best evaluation) or model/last  [default: best when the run has one]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="protocol option: videos per averaged batch (AVSBench S4/MS3 published: 4)  [default: each protocol's]",
)
@click.option("--frames-per-video", type=click.IntRange(min=1), help="protocol option: frames of a video without clip ids")
@click.option("--threshold", type=float, help="protocol option: the foreground probability threshold of the IoU")
@click.option(
    "--aggregation",
    type=click.Choice(["set", "video", "paper"]),
    help="protocol option: the whole set as one batch, per video, or the published batching (paper)",
)
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE", help="any protocol option, e.g. beta2=0.3")
def evaluate(
    pred_dir,
    manifest_path,
    protocol_name,
    split,
    subsets,
    png,
    scores,
    eval_size,
    as_json,
    run_dir,
    audio,
    device,
    recipe,
    checkpoint,
    cache,
    pipeline_file,
    model,
    probes,
    weights,
    batch_size,
    frames_per_video,
    threshold,
    aggregation,
    option_pairs,
):
    """Score predicted masks (--pred), a trained run (--run) or a recipe's checkpoint (--recipe
    --checkpoint) against the manifest's ground truth."""
    given = parse_options(batch_size, frames_per_video, threshold, aggregation, option_pairs)
    if recipe is not None:
        if given or weights:
            raise click.ClickException("--weights and the protocol options: for --run and --pred, not --recipe")
        return _evaluate_checkpoint(
            recipe, checkpoint, manifest_path, cache, pipeline_file, split, model, probes, device, as_json
        )
    if run_dir is not None:
        protocol = None if protocol_name == "all" else protocol_name
        return _evaluate_run(run_dir, split or None, audio, protocol, device, as_json, weights, given)
    if weights:
        raise click.ClickException("--weights: for --run")
    if eval_size not in ("paper", "native") and not eval_size.isdigit():
        raise click.ClickException(f"--eval-size must be paper, native or a number, not {eval_size!r}")
    if pred_dir is None or manifest_path is None:
        raise click.ClickException("give --pred DIR and --manifest FILE")
    if not os.path.isdir(pred_dir):
        raise click.ClickException(f"--pred {pred_dir}: no such directory")
    names = list(PROTOCOLS) if protocol_name == "all" else [protocol_name]
    options = protocol_options(names, given)
    results = evaluate_prediction_dir(pred_dir, manifest_path, names, split or None, subsets, png, scores, eval_size, options)
    report(results, as_json)


def report(results: dict[str, dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(format_table(results))


def _evaluate_checkpoint(recipe, checkpoint, manifest, cache, pipeline_file, split, model, probes, device, as_json):
    if checkpoint is None:
        raise click.ClickException("--recipe needs --checkpoint FILE (the weights to score)")
    if probes is not None:
        probes = [p.strip() for p in probes.split(",") if p.strip()]
    try:
        result = evaluate_checkpoint(
            recipe, checkpoint, manifest, cache, pipeline_file, split, model, probes, device, log=lambda *_: None
        )
    except (ConfigError, CueError, MissingClip, PipelineError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else checkpoint_table(result))


def _evaluate_run(run_dir, split, audio, protocol_name, device, as_json, weights=None, given=None):
    """``--run``: one JSON object (miou, fscore, protocol, aggregation, split, audio, weights,
    clips, ...) or a line."""
    try:
        parse_variant(audio)
        options = None
        if given:
            name = protocol_name or run_protocols(load_run(run_dir)[1])[0]
            options = protocol_options([name], given)[name]
        result = evaluate_saved_run(
            run_dir, split, audio, protocol_name, device, log=lambda *_: None, weights=weights, options=options
        )
    except (ConfigError, CueError, MissingClip, MetricInputError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"{result['run']}  {result['split']}  audio={result['audio']}  {result['protocol']}: "
            f"mIoU {_number(result['miou'])}  F {_number(result['fscore'])}  ({result['clips']} clips; "
            f"{result['aggregation']}; weights {result['weights']})"
        )
