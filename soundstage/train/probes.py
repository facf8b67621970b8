"""The cue of digital silence, for the ``muted`` audio-sensitivity probe.

"Muted" must mean what the model would see if the clip were silent: the cue that the *same*
audio model, with the same parameters, computes for an all-zero waveform — not a zero vector
(that is the ``zeroed`` probe). The stage output's ``stage.json`` says how it was made (stage,
version, parameters, upstream outputs); ``silent_values`` replays that stage's own ``load`` /
``setup`` / ``process`` on a silent 16 kHz clip of the wanted length, computing per-clip
upstream stages the same way (e.g. units: HuBERT features of silence, then the nearest
centroids of the *cached* k-means fit), and reading whole-dataset upstream results from the
cache as they are.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import soundfile as sf

from soundstage.audio import TARGET_SR
from soundstage.cache.reader import open_stage
from soundstage.cache.store import StageDir
from soundstage.pipeline.fingerprint import normalise_params
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.stage import LoadContext

SILENCE_ID = "__digital_silence__"


def silent_values(stage_dir: str, seconds: int, device: str = "cpu") -> dict:
    """The per-clip output (field -> array) of the stage output at ``stage_dir`` for ``seconds``
    of digital silence."""
    sd = StageDir(stage_dir)
    meta = sd.meta()
    stage = get_stage(meta["stage"])
    if stage.version != meta.get("version"):
        raise ValueError(
            f"{stage_dir} was made by {stage.name} version {meta.get('version')}, this soundstage has "
            f"version {stage.version}: the silence cue would not be comparable"
        )
    given = dict(meta.get("params", {}))
    if any(p.name == "device" for p in stage.params):
        given["device"] = device
    params = normalise_params(stage, given)
    cache_root = os.path.dirname(os.path.dirname(os.path.abspath(stage_dir)))
    upstream = {}
    for alias, up in meta.get("upstream", {}).items():
        up_dir = StageDir.at(cache_root, up["stage"], up["fingerprint"])
        if up_dir.meta().get("kind") == "global":
            upstream[alias] = open_stage(up_dir.path)
        else:
            upstream[alias] = {SILENCE_ID: silent_values(up_dir.path, seconds, device)}
    with tempfile.TemporaryDirectory(prefix="soundstage-silence-") as tmp:
        sf.write(os.path.join(tmp, "silence.wav"), np.zeros(seconds * TARGET_SR, dtype=np.int16), TARGET_SR, subtype="PCM_16")
        row = {
            "clip_id": SILENCE_ID,
            "audio_path": "silence.wav",
            "num_frames": str(seconds),
            "audio_sample_rate": str(TARGET_SR),
            "audio_channels": "1",
            "audio_seconds": str(float(seconds)),
        }
        item = stage.load(row, LoadContext(params=params, upstream=upstream, manifest_dir=tmp))
        model = stage.setup(params) if stage.setup else None
        return stage.process(model, [item], params)[0]


def silence_cue(stage_dir: str, field: str, seconds: int, device: str = "cpu") -> np.ndarray:
    """``[seconds, ...]`` float32: the field ``field`` of the silence output (see the module)."""
    values = silent_values(stage_dir, seconds, device)
    if field not in values:
        raise KeyError(f"the {StageDir(stage_dir).meta()['stage']} stage gives no field {field!r} for silence")
    return np.asarray(values[field], dtype=np.float32)
