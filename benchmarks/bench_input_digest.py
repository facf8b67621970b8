"""What ``--input-digest content`` costs: input digests of a manifest by size + mtime vs by content.

Each clip has a 10 s 16 kHz wav (``audio_path``) and a folder of 5 JPEG-sized frames
(``frames_dir``), as the synthetic AVSBench layout has. In the same process, the digests of every
clip are computed

- ``stat``: size + mtime of each file (the default);
- ``content, first run``: every file hashed (xxh3-128) and the hashes stored (SQLite);
- ``content, later run``: a new process's view: the hashes looked up by path, inode, size, mtime.

    python benchmarks/bench_input_digest.py [--clips 500] [--dir /tmp/bench_input_digest]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from soundstage.cache import digest


def build(root: str, clips: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        clip = os.path.join(root, f"clip{i:05d}")
        os.makedirs(os.path.join(clip, "frames"))
        with open(os.path.join(clip, "audio.wav"), "wb") as f:
            f.write(rng.bytes(320_044))  # the size of 10 s of 16-bit 16 kHz mono
        for k in range(5):
            with open(os.path.join(clip, "frames", f"{k}.jpg"), "wb") as f:
                f.write(rng.bytes(40_000))
        rows.append({"clip_id": f"clip{i:05d}", "audio_path": f"clip{i:05d}/audio.wav", "frames_dir": f"clip{i:05d}/frames"})
    return rows


def digest_all(rows: list[dict], root: str) -> float:
    t = time.perf_counter()
    for row in rows:
        digest.clip_digest(row, ("audio_path", "frames_dir"), root, {})
    digest.CONTENT_HASHES.flush()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--dir", default="/tmp/bench_input_digest")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    data = os.path.join(args.dir, "data")
    rows = build(data, args.clips)
    os.environ["SOUNDSTAGE_DIGEST_CACHE"] = os.path.join(args.dir, "digests")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(data) for f in files)
    print(f"{len(rows)} clips, {6 * len(rows)} files, {size / 1e6:.0f} MB (page cache warm)")
    results = {}
    os.environ["SOUNDSTAGE_INPUT_DIGEST"] = "stat"
    results["stat"] = min(digest_all(rows, data) for _ in range(3))
    os.environ["SOUNDSTAGE_INPUT_DIGEST"] = "content"
    results["content, first run"] = digest_all(rows, data)
    later = []
    for _ in range(3):
        digest.CONTENT_HASHES = digest.ContentHashes()  # as a new process: nothing in memory
        later.append(digest_all(rows, data))
    results["content, later run"] = min(later)
    for name, seconds in results.items():
        print(f"  {name:<20} {seconds:7.3f} s  {1e6 * seconds / len(rows):8.0f} us/clip  {seconds / results['stat']:6.1f}x stat")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
