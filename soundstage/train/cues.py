"""Choosing the cached cues a training run reads — also a public API for your own scripts.

A *cue* is one field of one stage output, read per clip and per video frame (second)::

    from soundstage.train.cues import CueSpec, open_cue, pipeline_output, select_output

    hubert = select_output("cache", "hubert", "layer=9")          # the hubert output with layer=9
    units = select_output("cache", "units", {"top_k": 3})          # by the upstream's own parameters
    beats = pipeline_output("pipeline.yaml", "beats")              # what a pipeline file selects
    audio = open_cue(CueSpec("audio", "beats", "second_embeddings"), cache="cache")
    audio["<clip id>"]                                             # float32 [seconds, 768]

``select_output`` takes what the stage commands take for an upstream (a fingerprint or a unique
prefix, ``key=value,...``, or a dict; nothing: the only output in the cache, printed) and fails
listing the candidates when the choice is ambiguous. ``pipeline_output`` gives the output whose
fingerprint the pipeline file's parameters produce (the one ``soundstage run FILE`` writes).

Cue roles in training: ``audio`` (a vector per frame, ``[T, D]``), ``active`` (active queries
per frame: query ids ``[T, k]`` with -1 as padding, the ``active-queries`` stage's lists, or
weights ``[T, Q]``), ``text`` (text-cue
slots ``[T, S, D]`` with their mask field ``[T, S]``), ``prior`` (the masks stage's foreground
probability per video frame, ``[T, H, W]``, indexed by frame rather than second). ``collate_ragged`` pads ragged arrays of
a batch to a common shape and returns the validity mask with them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from soundstage.cache.reader import MissingClip, StageReader
from soundstage.cache.store import StageDir
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import UpstreamError, choose, expected_fingerprint

#: --audio NAME -> (stage, field) of the per-second audio vector
AUDIO_CUES = {
    "vggish": ("vggish", "embeddings"),
    "beats": ("beats", "second_embeddings"),
    "beats-probs": ("beats", "second_probs"),
    "units": ("units", "frame_hist"),
}
#: --active NAME -> (stage, field) of per-second query ids
ACTIVE_CUES = {"units": ("units", "frame_topk"), "active-queries": ("active-queries", "query_ids")}
#: cue fields that hold every frame's values concatenated -> the field with the count per frame
RAGGED_PER_FRAME = {("active-queries", "query_ids"): "frame_lengths"}
#: the text-cue stage's (cues, mask) fields
TEXT_CUES = ("textcues", "cues", "cue_mask")
#: the mask prior: the masks stage's per-frame foreground probabilities (uint8, p * 255)
PRIOR_CUE = ("masks", "probs")


class CueError(ValueError):
    """A cue that cannot be used (no such output or field, a clip missing from it, a bad shape)."""


@dataclass(frozen=True)
class CueSpec:
    role: str  # audio | active | text
    stage: str
    field: str
    #: which output of the stage: fingerprint (prefix), "key=value,...", a dict, or None (the only one)
    selector: str | dict | None = None
    mask_field: str | None = None  # text cues: the slot mask
    lengths_field: str | None = None  # values of all frames concatenated: the count per frame

    def to_dict(self) -> dict:
        return asdict(self)


def audio_cue(name: str, selector=None) -> CueSpec:
    """The cue ``--audio NAME`` means (vggish, beats, beats-probs, units) or ``STAGE:FIELD``."""
    stage, field = AUDIO_CUES.get(name) or _stage_field(name, "--audio", AUDIO_CUES)
    return CueSpec("audio", stage, field, selector)


def active_cue(name: str, selector=None) -> CueSpec:
    stage, field = ACTIVE_CUES.get(name) or _stage_field(name, "--active", ACTIVE_CUES)
    return CueSpec("active", stage, field, selector, lengths_field=RAGGED_PER_FRAME.get((stage, field)))


def text_cue(selector=None) -> CueSpec:
    stage, field, mask = TEXT_CUES
    return CueSpec("text", stage, field, selector, mask_field=mask)


def prior_cue(setting: str) -> CueSpec:
    """``--prior masks`` (the only masks output) or ``masks=SELECTOR`` (fingerprint or key=value,...)."""
    name, _, selector = setting.partition("=")
    if name != "masks":
        raise CueError(f"--prior {setting!r}: use masks or masks=SELECTOR")
    stage, field = PRIOR_CUE
    return CueSpec("prior", stage, field, selector or None)


def _stage_field(name: str, option: str, known: dict) -> tuple[str, str]:
    stage, sep, field = name.partition(":")
    if not sep or not stage or not field:
        raise CueError(f"{option} {name!r}: use one of {', '.join(known)} or STAGE:FIELD")
    return stage, field


def select_output(cache: str, stage: str, selector=None, log=print) -> StageDir:
    """The output of ``stage`` in ``cache`` that ``selector`` picks (see the module docstring)."""
    try:
        return choose(cache, get_stage(stage), selector, log=log)
    except (UpstreamError, KeyError) as e:
        raise CueError(str(e).strip("'\"")) from None


def pipeline_output(pipeline_file: str, stage: str) -> StageDir:
    """The output of ``stage`` that the pipeline file's parameters give (it must exist)."""
    pipe = load_pipeline(pipeline_file)
    sd = StageDir.at(pipe.cache, stage, expected_fingerprint(stage, pipe.stages))
    if not sd.exists():
        raise CueError(
            f"{pipeline_file}: no {stage} output {os.path.basename(sd.path)} in {pipe.cache} yet "
            f"(run `soundstage run {pipeline_file} {stage}`)"
        )
    return sd


def open_cue(spec: CueSpec, cache: str | None = None, stage_dir: str | None = None, log=print) -> StageReader:
    """A reader of the spec's field(s), from ``stage_dir`` or chosen in ``cache`` by its selector."""
    path = stage_dir or select_output(cache, spec.stage, spec.selector, log=log).path
    fields = [spec.field] + [f for f in (spec.mask_field, spec.lengths_field) if f]
    try:
        return StageReader(path, fields=fields)
    except KeyError as e:
        raise CueError(str(e).strip("'\"")) from None


def check_clips(reader: StageReader, clip_ids, what: str) -> None:
    """A clip of the run missing from a cue's output is an error naming it — never a substitute."""
    missing = [cid for cid in clip_ids if cid not in reader]
    if missing:
        meta = reader.meta
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingClip(
            f"{what}: {len(missing)} clip(s) missing from {meta['stage']} output {meta['fingerprint']} "
            f"({reader.dir.path}): {shown}. Run `soundstage {meta['stage']}` for them"
        )


def provenance(reader: StageReader) -> dict:
    """What a run records about a cache it read: path, fingerprint and the stage.json identity."""
    meta = reader.meta
    return {
        "path": os.path.abspath(reader.dir.path),
        "stage": meta["stage"],
        "version": meta.get("version"),
        "fingerprint": meta["fingerprint"],
        "params": meta.get("params", {}),
        "fingerprint_payload": meta.get("fingerprint_payload", {}),
        "upstream": meta.get("upstream", {}),
        "clips": len(reader),
    }


def collate_ragged(arrays) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack arrays of equal rank but different shapes, zero-padded at the end of each axis.

    Returns ``(values [B, *max_shape], valid [B, *max_shape] bool)``."""
    arrays = [torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in arrays]
    if len({a.dim() for a in arrays}) != 1:
        raise ValueError("collate_ragged: arrays of different rank")
    shape = [max(sizes) for sizes in zip(*(a.shape for a in arrays))]
    values = arrays[0].new_zeros((len(arrays), *shape))
    valid = torch.zeros((len(arrays), *shape), dtype=torch.bool)
    for i, a in enumerate(arrays):
        index = (i, *(slice(0, n) for n in a.shape))
        values[index] = a
        valid[index] = True
    return values, valid
