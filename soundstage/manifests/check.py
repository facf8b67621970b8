"""Checking the files a manifest row references: each one is opened, not only stat'ed.

Header-only where the format allows, so a large dataset is checked in minutes:

- wav (any libsndfile format): ``soundfile.info`` parses the header; zero frames is a problem.
- png: PIL ``verify()`` walks every chunk and checks its CRC without decompressing, so a
  truncated or bit-flipped file fails.
- jpg: PIL parses the header; a JPEG has no chunk CRCs, so truncation is caught by looking
  for the end-of-image marker (FF D9) in the file's tail.

``decode=True`` additionally decodes every image fully (slower; catches corrupt entropy data).
Files are checked in a thread pool: the work is mostly waiting on the file system, and PIL
and libsndfile release the GIL while they read.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import soundfile as sf
from PIL import Image

from soundstage.audio import soundfile_name
from soundstage.pipeline.progress import progress_bar

JPEG_END_MARKER = b"\xff\xd9"
# Some encoders pad after the end marker; look for it in the last bytes, not only the last two.
JPEG_TAIL_BYTES = 1024


@dataclass
class FileCheck:
    """One file to open. ``what`` names it in a problem, e.g. "frame 3", "audio"."""

    path: str
    what: str


@dataclass
class ClipCheck:
    """All the files of one clip, plus causes already known without opening anything."""

    files: list[FileCheck] = field(default_factory=list)
    known_problems: list[str] = field(default_factory=list)


@dataclass
class ClipReport:
    problems: list[str]
    audio: dict  # sample_rate, channels, seconds of the audio file ("" when unreadable)


def _tail_has_jpeg_end(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - JPEG_TAIL_BYTES))
        return JPEG_END_MARKER in f.read()


def check_image(path: str, decode: bool = False) -> str | None:
    """``None`` for a good image, else a one-word cause: missing, zero-byte, unreadable, truncated."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte"
        with Image.open(path) as image:
            image_format = image.format
            if decode:
                image.load()
            else:
                image.verify()
        if image_format == "JPEG" and not _tail_has_jpeg_end(path):
            return "truncated"
    except FileNotFoundError:
        return "missing"
    except (OSError, SyntaxError, ValueError) as e:  # PIL signals bad data with these
        return "truncated" if "truncated" in str(e).lower() else "unreadable"
    return None


def check_audio(path: str) -> tuple[str | None, dict]:
    """(cause or ``None``, header facts) for an audio file."""
    facts = {"audio_sample_rate": "", "audio_channels": "", "audio_seconds": ""}
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte", facts
        info = sf.info(soundfile_name(path))
    except FileNotFoundError:
        return "missing", facts
    except Exception:  # libsndfile raises LibsndfileError / RuntimeError for bad headers
        return "unreadable", facts
    facts = {
        "audio_sample_rate": str(info.samplerate),
        "audio_channels": str(info.channels),
        "audio_seconds": f"{info.frames / info.samplerate:.3f}" if info.samplerate else "",
    }
    if info.frames <= 0:
        return "empty", facts
    return None, facts


def check_clip(clip: ClipCheck, decode: bool = False) -> ClipReport:
    problems = list(clip.known_problems)
    audio_facts = {"audio_sample_rate": "", "audio_channels": "", "audio_seconds": ""}
    for file in clip.files:
        if file.what == "audio":
            cause, audio_facts = check_audio(file.path)
        else:
            cause = check_image(file.path, decode=decode)
        if cause:
            problems.append(f"{cause} {file.what}")  # e.g. "missing frame 3"
    return ClipReport(problems=problems, audio=audio_facts)


def check_clips(clips: list[ClipCheck], workers: int = 16, decode: bool = False, progress: bool = False) -> list[ClipReport]:
    """Reports in the order of ``clips``; ``workers`` threads (1 = in this thread); ``progress``: a
    bar on stderr (updated every 30 s when stderr is not a terminal, e.g. in a job's log)."""
    bar = progress_bar(len(clips), "checking clips", progress)

    def check(c):
        report = check_clip(c, decode)
        bar.update(1)
        return report

    with bar:
        if workers <= 1 or len(clips) < 2:
            return [check(c) for c in clips]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(check, clips))
