"""Building, validating and reading manifests (one row per clip).

Build: ``soundstage.manifests.avsbench.build_avsbench_manifest`` (CLI ``soundstage manifest
avsbench``); generate the synthetic dataset: ``soundstage.manifests.synth.make_synthetic_dataset``
(CLI ``soundstage manifest synth``). Read and locate files with the helpers below.
"""

from soundstage.manifests.table import (  # noqa: F401
    annotated_frames,
    duplicate_ids,
    frame_path,
    good_clips,
    label_path,
    mask_kind,
    read_manifest,
    resolve_path,
    write_manifest,
)
