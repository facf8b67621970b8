"""Run at start-up by every Python process of the SLURM test jobs.

tests/test_slurm.py puts this folder on PYTHONPATH for the jobs it submits, so the processes
SLURM starts see what the test process set up in-process:

* the test stages ``test-loudest`` and ``test-mean`` are registered (soundstage_test_stages.py);
* ``SOUNDSTAGE_TEST_GATES="clip_id=fifo,..."``: decoding a listed clip's audio first waits until
  the test opens that named pipe, so a task can be stopped at a known clip of its shard.
"""

import os

try:
    import soundstage_test_stages

    soundstage_test_stages.register()
except ImportError:  # soundstage not importable in this interpreter: nothing to set up
    soundstage_test_stages = None

_GATES = dict(item.split("=", 1) for item in os.environ.get("SOUNDSTAGE_TEST_GATES", "").split(",") if item)

if _GATES and soundstage_test_stages is not None:
    import soundstage.audio as _audio

    _load_audio = _audio.load_audio

    def _gated_load_audio(path, *args, **kwargs):
        for clip_id, fifo in _GATES.items():
            if f"{os.sep}{clip_id}{os.sep}" in path:
                with open(fifo, "rb") as gate:  # blocks until the test opens the pipe for writing
                    gate.read()
        return _load_audio(path, *args, **kwargs)

    _audio.load_audio = _gated_load_audio  # before any stage module imports it
