"""Clean shutdown: decoding workers end with a killed stage, SIGTERM to ``--jobs N`` is passed on
and the shard summaries merged, a stop in a stage's last batch stops ``soundstage run``'s chain,
and Ctrl-C ends with the summary of what was committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _wavs import make_wavs, write_manifest
from engine_stages import SLOW

from soundstage.cache import open_stage
from soundstage.pipeline.lifeline import alive
from soundstage.pipeline.runner import run_stage

HERE = os.path.dirname(os.path.abspath(__file__))

CLI_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from soundstage.cli import main
from soundstage.stages import register_stage
register_stage("toy-slow", "engine_stages:SLOW")
register_stage("toy-wait", "shutdown_stages:WAIT")
register_stage("toy-after", "shutdown_stages:AFTER")
register_stage("toy-slow-load", "shutdown_stages:SLOW_LOAD")
main({args!r})
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    return write_manifest(str(root), make_wavs(str(root), n=8, seconds=(1, 2)))


def start_cli(tmp_path, *args, **popen):
    """The CLI in a subprocess whose output goes to files: a process left behind holding them
    cannot make the test hang (as it would holding a pipe)."""
    script = CLI_SCRIPT.format(tests=HERE, args=[str(a) for a in args])
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    return subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=err, text=True, **popen)


def finish(proc, tmp_path, timeout=60) -> tuple[str, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()


def wait_for_files(folder, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while len(os.listdir(folder)) < count:
        assert proc.poll() is None, f"exited {proc.returncode} early"
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no progress")
        time.sleep(0.05)


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def wait_gone(pids, timeout=20) -> set[int]:
    """The processes of ``pids`` still alive after ``timeout`` s (then ended: the test started them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    left = {p for p in pids if alive(p)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_decoding_workers_exit_when_the_stage_is_killed(manifest, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = start_cli(
        tmp_path,
        "toy-slow",
        "--manifest",
        manifest,
        "--cache",
        tmp_path / "c",
        "--workers",
        2,
        "--no-progress",
        "--sleep",
        0.3,
        "--marker-dir",
        markers,
    )
    wait_for_files(markers, 1, proc)
    below = descendants(proc.pid)
    assert len(below) >= 3, below  # forkserver, resource tracker, decoding workers
    proc.kill()  # kill -9 of the stage alone: nobody tells its helpers
    proc.wait()
    assert wait_gone(below) == set()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_sigterm_to_jobs_is_passed_on_and_the_summaries_merged(manifest, tmp_path):
    markers, cache = tmp_path / "markers", tmp_path / "c"
    markers.mkdir()
    proc = start_cli(
        tmp_path,
        "toy-slow",
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--jobs",
        2,
        "--workers",
        0,
        "--batch-size",
        1,
        "--commit-every",
        1000,
        "--sleep",
        0.4,
        "--marker-dir",
        markers,
    )
    wait_for_files(markers, 2, proc)
    below = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # to the parent only, as `kill PID` does
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 1, out + err
    assert "INTERRUPTED" in out and "Traceback" not in err, out + err
    assert wait_gone(below) == set()  # no shard runs on unsupervised
    done = int(out.split("done ")[1].split(",")[0])
    assert 0 < done < 8
    again = run_stage(SLOW, manifest, str(cache), {"sleep": 0.0}, progress=False)  # no lock left behind
    assert again.cached == done and again.done == 8 - done


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_sigterm_to_jobs_with_busy_decoding_workers_ends_every_process(manifest, tmp_path):
    """Each shard process has its own pool of decoding workers, busy when the stop comes: the
    shard ends them (it no longer needs what they decode) instead of waiting on them forever."""
    markers, cache = tmp_path / "markers", tmp_path / "c"
    markers.mkdir()
    options = "--jobs 2 --workers 2 --load-sleep 1.5".split()
    proc = start_cli(tmp_path, "toy-slow-load", *options, "--manifest", manifest, "--cache", cache, "--marker-dir", markers)
    wait_for_files(markers, 2, proc)  # both shards have processed a clip; their workers decode the next ones
    below = descendants(proc.pid)
    assert len(below) >= 8, below  # 2 shards, each with a fork server and 2 workers
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = finish(proc, tmp_path, timeout=20)
    finally:
        left = wait_gone(below, timeout=5)
    assert proc.returncode == 1 and "INTERRUPTED" in out, out + err
    assert left == set()
    done = int(out.split("done ")[1].split(",")[0])
    assert len(open_stage(out.split("output: ")[1].split()[0])) == done >= 2


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_sigterm_to_the_process_group_commits_and_stops(manifest, tmp_path):
    """SLURM's time limit, ``timeout`` and ``kill -- -PGID`` signal every process: the decoding
    workers, busy, leave the stop to the stage, which commits what is finished and reports."""
    markers, cache = tmp_path / "markers", tmp_path / "c"
    markers.mkdir()
    options = "--workers 2 --load-sleep 1.0".split()
    proc = start_cli(
        tmp_path,
        "toy-slow-load",
        *options,
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--marker-dir",
        markers,
        start_new_session=True,
    )
    wait_for_files(markers, 2, proc)
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, err = finish(proc, tmp_path, timeout=20)
    finally:
        left = wait_gone(below, timeout=5)
    assert proc.returncode == 1 and "INTERRUPTED" in out and "Traceback" not in err and "Error" not in err, out + err
    assert left == set()
    assert len(open_stage(out.split("output: ")[1].split()[0])) == int(out.split("done ")[1].split(",")[0]) >= 2


def test_a_stop_in_the_last_batch_stops_the_chain(manifest, tmp_path):
    markers, cache = tmp_path / "markers", tmp_path / "c"
    markers.mkdir()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"manifest: {manifest}\ncache: {cache}\nstages:\n  toy-wait: {{sleep: 0.5, marker_dir: {markers}}}\n  toy-after: {{}}\n"
    )
    proc = start_cli(tmp_path, "run", pipeline, "--workers", 0)
    wait_for_files(markers, 1, proc)  # the only batch of toy-wait has begun
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 1, out + err
    assert "stopping: toy-wait was interrupted" in out, out + err
    assert not (cache / "toy-after").exists()


def test_ctrl_c_prints_the_summary_of_what_was_committed(manifest, tmp_path):
    markers, cache = tmp_path / "markers", tmp_path / "c"
    markers.mkdir()
    proc = start_cli(
        tmp_path,
        "toy-slow",
        "--manifest",
        manifest,
        "--cache",
        cache,
        "--workers",
        2,
        "--batch-size",
        1,
        "--no-progress",
        "--sleep",
        0.4,
        "--marker-dir",
        markers,
        start_new_session=True,
    )
    wait_for_files(markers, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole process group
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 1, out + err
    assert "INTERRUPTED" in out and "Traceback" not in err and "Aborted" not in out + err, out + err
    done = int(out.split("done ")[1].split(",")[0])
    assert done >= 2
    assert len(open_stage(out.split("output: ")[1].split()[0])) == done
