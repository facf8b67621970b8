"""The training stage: an audio-conditioned Mask2Former trained from the manifest and the caches.

Public pieces: ``soundstage.train.cues`` (choose cache outputs by upstream parameters or a
pipeline file; ``collate_ragged``), ``soundstage.train.data.AVSClips`` (the Dataset) and
``collate_frames``, ``soundstage.train.loop.train`` (the loop), ``soundstage.train.checkpoint``
(exact resume), ``soundstage.train.run_dir`` (the run directory layout).
"""
