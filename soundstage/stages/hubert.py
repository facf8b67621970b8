"""hubert: one layer of HuBERT features per clip, as fairseq's ``dump_hubert_feature.py`` writes them.

Audio is decoded and resampled to 16 kHz mono in the workers; clips of equal length share a
batch (AVSBench clips are 5 s or 10 s, so batches need no padding and each clip's features are
exactly what a one-clip forward gives). Layer semantics, waveform normalisation and 100 s
chunking are those of fairseq (see ``soundstage.models.hubert``).
"""

import numpy as np

from soundstage.audio import TARGET_SR, load_audio, max_seconds_param
from soundstage.device import device_param, dtype_param, resolve_device
from soundstage.manifests.table import resolve_path
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.stage import Field, Param, Stage

DEFAULT_MODEL = "facebook/hubert-base-ls960"
#: clips longer than this are run alone, after what is finished is committed (see ``Stage.risky``)
RISKY_SECONDS = 120


def load(row, ctx):
    return load_audio(resolve_path(row["audio_path"], ctx.manifest_dir), max_seconds=ctx.params.get("max_seconds")).wave


def risky(wave) -> bool:
    return len(wave) > RISKY_SECONDS * TARGET_SR


def setup(params):
    from soundstage.models.hubert import load_hubert  # brings torch and transformers: setup() only, never in decoding workers

    extractor = load_hubert(params["model"], device=resolve_device(params["device"]), dtype=params["dtype"])
    extractor.check_layer(params["layer"])
    return extractor


def process(extractor, waves, params):
    import torch  # not at module level: decoding workers import this module

    batch = torch.from_numpy(np.stack(waves))  # equal lengths: batch_key is the sample count
    if extractor.device.type == "cuda":
        batch = batch.pin_memory()  # lets the host-to-device copy run asynchronously
    feats = extractor.extract_batch(batch, params["layer"], out_dtype=np.float16)
    return [{"features": f} for f in feats]


STAGE = Stage(
    name="hubert",
    reads=("audio_path",),  # manifest columns load uses (their files are digested too)
    required_columns=("audio_path",),
    version=1,
    help="HuBERT features of one transformer layer per clip (fairseq dump_hubert_feature semantics).",
    params=[
        Param(
            "model",
            str,
            DEFAULT_MODEL,
            "hub id, transformers directory, or fairseq HuBERT checkpoint .pt",
            identity=model_identity,
        ),
        Param("layer", int, 7, "1-based transformer block whose output is stored (fairseq output_layer)"),
        dtype_param(),
        device_param(),
        max_seconds_param(),
    ],
    fields=[
        Field("features", "float16", (None, None), "[frames, dim], 50 frames/s; dim is the model's width"),
    ],
    load=load,
    setup=setup,
    process=process,
    batch_key=len,  # the sample count: only equal-length clips share a batch (no padding)
    risky=risky,
    default_batch_size=16,
    resources={"gpus": 1, "cpus": 8, "mem": "32G"},
)
