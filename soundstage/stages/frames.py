"""frames: every video frame decoded once and resized for the model's input, as uint8.

Stored per clip: ``pixels`` uint8 ``[frames, S, S, 3]`` (RGB), each frame resized to ``--size``
square exactly as transformers' ``Mask2FormerImageProcessor`` does with ``size={"height": S,
"width": S}``: ``PIL.Image.resize((S, S), BILINEAR)`` of the RGB image, before any rescaling; and
``source_size`` int32 ``[frames, 2]``, each frame's (height, width) before resizing. Training reads
these instead of decoding JPEGs every epoch (``soundstage.train.data``: rescale and normalise on
uint8 gives the same tensors as decoding); ``soundstage export m2f-bundles`` writes bias_in_AVS's
processed bundles from them.
"""

import numpy as np

from soundstage.manifests.table import frame_path
from soundstage.pipeline.stage import ClipError, Field, Param, Stage
from soundstage.train.data import resized_frame


def load(row, ctx):
    size, pixels, sizes = ctx.params["size"], [], []
    for i in range(int(row["num_frames"])):
        try:
            frame, source_size = resized_frame(frame_path(row, i, ctx.manifest_dir), size)
        except OSError as e:
            raise ClipError(f"unreadable frame {i}: {e}") from None
        pixels.append(frame)
        sizes.append(source_size)
    return {"pixels": np.stack(pixels), "source_size": np.asarray(sizes, dtype=np.int32)}


STAGE = Stage(
    name="frames",
    reads=("frames_dir", "frame_pattern", "num_frames"),
    version=1,
    help="Every video frame resized once for the model's input (uint8, Mask2Former's bilinear resize), read by training.",
    params=[Param("size", int, 384, "side of the square model input (the seed methods' Mask2Former: 384)")],
    fields=[
        Field("pixels", "uint8", (None, None, None, 3), "[frames, size, size, 3] RGB, resized"),
        Field("source_size", "int32", (None, 2), "[frames, 2] (height, width) of each decoded frame"),
    ],
    load=load,
    default_batch_size=16,
)
