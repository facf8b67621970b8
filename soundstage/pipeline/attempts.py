"""Clips that may take the whole process down (out of memory), and the ones that did.

A stage may declare some items risky (``Stage.risky``, e.g. very long audio). The runner commits
what is finished before such an item, runs it alone, and leaves a marker naming it while it runs
(``attempts/<shard>.json`` in the output). A marker still there when the shard runs again means
the process died in that clip: it is then recorded as failed with that cause, and later runs skip
it (``--force`` tries it again), so a shard with one clip too big for the machine still finishes.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

from soundstage.cache.store import atomic_write_text

#: why a clip is skipped once it killed a run
DIED_CAUSE = (
    "the run died while computing this clip (killed at {when}: out of memory?); skipped since, "
    "so the rest of the shard finishes. Lower its cost (e.g. --max-seconds, a smaller batch) or "
    "give the job more memory, then rerun with --force to try it again"
)


class Attempts:
    def __init__(self, stage_dir: str, writer_prefix: str):
        self.dir = os.path.join(stage_dir, "attempts")
        self.marker = os.path.join(self.dir, f"{writer_prefix}.json")
        self.died_log = os.path.join(self.dir, "died.jsonl")

    def collect(self) -> dict[str, str]:
        """clip id -> cause, for every clip a run of this stage output died in (this shard's
        marker left by a killed writer is moved to the record first; we hold the shard lock)."""
        if os.path.exists(self.marker):
            with open(self.marker, encoding="utf-8") as f:
                left = json.load(f)
            os.makedirs(self.dir, exist_ok=True)
            with open(self.died_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(left) + "\n")
            os.remove(self.marker)
        died = {}
        if os.path.exists(self.died_log):
            with open(self.died_log, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
                    died[record["clip_id"]] = DIED_CAUSE.format(when=when)
        return died

    def forget(self, clip_ids) -> None:
        """Try these clips again (``--force``): drop them from the record."""
        if not os.path.exists(self.died_log):
            return
        with open(self.died_log, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["clip_id"] not in set(clip_ids)]
        atomic_write_text(self.died_log, "".join(kept))

    @contextmanager
    def running(self, clip_id: str):
        """Mark ``clip_id`` as being computed for as long as the block runs."""
        os.makedirs(self.dir, exist_ok=True)
        atomic_write_text(self.marker, json.dumps({"clip_id": clip_id, "time": time.time(), "pid": os.getpid()}))
        try:
            yield
        finally:
            os.remove(self.marker)
