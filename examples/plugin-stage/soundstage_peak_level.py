"""peak-level: the loudest sample of each second of a clip, in dB full scale (an example plugin).

A stage is a declaration: its parameters, the fields it stores per clip, and ``load`` (runs in
decoding worker processes, one manifest row at a time). Without ``process`` the dict that
``load`` returns is stored as it is; a model stage would add ``setup`` (loads the model once)
and ``process`` (a batch of loaded items -> one dict per clip).
"""

import numpy as np

from soundstage.audio import TARGET_SR, load_audio
from soundstage.pipeline.stage import ClipError, Field, Param, Stage

FLOOR_DB = -120.0


def load(row, ctx):
    path = row["audio_path"]
    if not path:
        raise ClipError("no audio_path in the manifest row")  # this clip fails; the run goes on
    wave = load_audio(path if path.startswith("/") else f"{ctx.manifest_dir}/{path}").wave  # 16 kHz mono
    seconds = max(1, int(np.ceil(len(wave) / TARGET_SR)))
    peaks = np.array([np.abs(wave[i * TARGET_SR : (i + 1) * TARGET_SR]).max(initial=0.0) for i in range(seconds)])
    peak_db = np.maximum(20 * np.log10(np.maximum(peaks, 1e-12)), FLOOR_DB)
    return {"peak_db": peak_db.astype(np.float32), "clipped": bool((peaks >= ctx.params["clip_level"]).any())}


STAGE = Stage(
    name="peak-level",
    version=1,
    help="Peak level (dB full scale) of every second of each clip, and whether it reaches --clip-level.",
    params=[Param("clip_level", float, 0.999, "a sample this loud (full scale = 1) counts as clipped")],
    fields=[
        Field("peak_db", "float32", (None,), "peak |sample| per second at 16 kHz mono (dB full scale)"),
        Field("clipped", "bool", (), "some sample reaches --clip-level"),
    ],
    load=load,
)
