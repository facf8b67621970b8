"""SLURM executor: the generated sbatch scripts, and whole runs on a real (single-node) SLURM.

The script tests need no SLURM. The cluster tests need ``sbatch`` on PATH and a running cluster
(``.ci/slurm/start.sh`` installs and starts one); they are skipped only when ``sbatch`` is absent.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from soundstage.cache import open_stage, read_result
from soundstage.cli import main
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.pipeline import slurm
from soundstage.pipeline.runner import manifest_rows, plan_stage
from soundstage.pipeline.shard import shard_of
from soundstage.stages import get_stage

HERE = os.path.dirname(os.path.abspath(__file__))
SITE = os.path.join(HERE, "slurm_site")  # sitecustomize for the jobs: test stage + gates
sys.path.insert(0, SITE)
import soundstage_test_stages  # noqa: E402

soundstage_test_stages.register()

needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="sbatch not on PATH: no SLURM here (CI starts one with .ci/slurm/start.sh)"
)


def _job(**overrides):
    fields = dict(
        name="soundstage-audio-stats",
        command=[
            "/venv/bin/python",
            "-m",
            "soundstage.cli",
            "audio-stats",
            "--manifest",
            "/d/manifest.csv",
            "--cache",
            "/c",
            "--silence-db",
            "-60.0",
        ],
        log_dir="/c/audio-stats/abc/logs",
        workdir="/home/me/exp",
        resources=slurm.Resources(partition="gpu", time="02:00:00", mem="16G", cpus=4, gpus=1, max_parallel=8),
        num_shards=16,
        description="stage audio-stats",
    )
    fields.update(overrides)
    return slurm.SlurmJob(**fields)


def test_array_script_text():
    (script,) = slurm.render_scripts(_job())
    assert (
        script
        == """#!/bin/bash
# stage audio-stats
#SBATCH --array=0-15%8
#SBATCH --output=/c/audio-stats/abc/logs/%A_%a.out
#SBATCH --job-name=soundstage-audio-stats
#SBATCH --chdir=/home/me/exp
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --partition=gpu
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
export PYTHONUNBUFFERED=1
exec /venv/bin/python -m soundstage.cli audio-stats --manifest /d/manifest.csv --cache /c --silence-db -60.0 --shard "${SLURM_ARRAY_TASK_ID}/16"
"""
    )


def test_single_job_for_a_whole_dataset_stage():
    res = slurm.Resources(requeue=False, signal=None, account="lab", qos="long", extra=["--constraint=a100"])
    (script,) = slurm.render_scripts(_job(num_shards=None, resources=res, description=""))
    lines = script.splitlines()
    assert "#SBATCH --output=/c/audio-stats/abc/logs/%j.out" in lines
    assert not [x for x in lines if "--array" in x or "--requeue" in x or "--signal" in x]
    assert "#SBATCH --account=lab" in lines and "#SBATCH --qos=long" in lines and "#SBATCH --constraint=a100" in lines
    assert lines[-1].endswith("--silence-db -60.0")  # the whole dataset: no --shard


def _parse_array(spec):
    """Independent reading of an --array value: task ids and the throttle."""
    spec, _, throttle = spec.partition("%")
    ids = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
    return ids, int(throttle) if throttle else None


def _run_script(script, task_id, tmp_path):
    """Execute a generated script as SLURM would start task ``task_id``; returns the argv it execs."""
    path = tmp_path / "job.sh"
    path.write_text(script.replace("exec ", "exec printf '%s\\n' ", 1))
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task_id))
    out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("shard_ids", [list(range(2500)), [3, 1000, 1001, 1005, 1006, 2002, 2499]])
def test_arrays_above_max_array_size_are_split_and_cover_each_shard_once(shard_ids, tmp_path):
    scripts = slurm.render_scripts(_job(num_shards=2500, shard_ids=shard_ids), max_array_size=1001)
    covered = []
    for script in scripts:
        spec = next(x for x in script.splitlines() if x.startswith("#SBATCH --array=")).split("=", 1)[1]
        tasks, throttle = _parse_array(spec)
        assert throttle == 8 and max(tasks) <= 1000  # every task id below MaxArraySize
        offsets = set()
        for task in (tasks[0], tasks[-1]):
            argv = _run_script(script, task, tmp_path)
            assert argv[-2] == "--shard" and argv[-1].endswith("/2500")
            offsets.add(int(argv[-1].split("/")[0]) - task)
        (offset,) = offsets  # one offset per array
        covered += [t + offset for t in tasks]
    assert sorted(covered) == sorted(shard_ids)  # every shard exactly once
    assert len(scripts) == len({s // 1001 for s in shard_ids})


def test_array_chunks_and_spec():
    assert slurm.array_chunks([3, 1005, 1006, 2400, 7], 1001) == [(0, [3, 7]), (1001, [4, 5]), (2002, [398])]
    assert slurm.array_spec([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert slurm.array_spec([5], 2) == "5%2"


def test_resources_merge_in_order_and_reject_unknown_names():
    declared = {"gpus": 1, "cpus": 8, "mem": "32G"}
    merged = slurm.Resources.merged(declared, {"mem": "4G", "time": None}, {"gpus": 0, "max-parallel": 3})
    assert (merged.gpus, merged.cpus, merged.mem, merged.time, merged.max_parallel) == (0, 8, "4G", None, 3)
    assert "--gres=gpu:0" not in merged.sbatch_options()  # 0 drops a declared GPU request
    with pytest.raises(slurm.SlurmError, match="unknown resource 'gpu'"):
        slurm.Resources.merged({"gpu": 1})


# ------------------------------------------------------------------------------- dry run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), clips=16, seed=3, workers=1)


def _clip_ids(manifest):
    return [r["clip_id"] for r in manifest_rows(manifest)[0]]


def test_dry_run_prints_a_script_that_runs_its_shard(dataset, tmp_path):
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        main,
        [
            "audio-stats",
            "--manifest",
            dataset,
            "--cache",
            str(cache),
            "--executor",
            "slurm",
            "--shards",
            "4",
            "--dry-run",
            "--partition",
            "short",
            "--time",
            "0:10:00",
            "--mem",
            "2G",
            "--max-parallel",
            "2",
            "--silence-db",
            "-50",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not cache.exists()  # a dry run writes nothing
    out = result.output
    script = out[out.index("#!/bin/bash") :]
    for line in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --partition=short",
        "#SBATCH --time=0:10:00",
        "#SBATCH --mem=2G",
        "#SBATCH --requeue",
    ):
        assert line in script.splitlines()
    plan = plan_stage(get_stage("audio-stats"), dataset, str(cache), {"silence_db": -50.0})
    assert f"#SBATCH --output={plan.dir.path}/logs/%A_%a.out" in script.splitlines()
    assert out.splitlines()[0].startswith("# --- soundstage-audio-stats: sbatch --parsable ")

    # the printed script, run by hand as array task 1, computes exactly shard 1/4 of the output
    path = tmp_path / "task.sh"
    path.write_text(script)
    subprocess.run(["bash", str(path)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1"), check=True, capture_output=True)
    expected = {c for c in _clip_ids(dataset) if shard_of(c, 4) == 1}
    assert expected and plan.dir.committed_ids() == expected
    assert open_stage(plan.dir.path)[sorted(expected)[0]]["silent"].dtype == bool


# ------------------------------------------------------------------------------- real SLURM


def _read_all(stage_dir):
    reader = open_stage(stage_dir)
    return {cid: {k: np.asarray(v) for k, v in reader[cid].items()} for cid in reader}


def _assert_same_outputs(a_dir, b_dir):
    a, b = _read_all(a_dir), _read_all(b_dir)
    assert sorted(a) == sorted(b)
    for cid in a:
        assert a[cid].keys() == b[cid].keys()
        for field in a[cid]:
            np.testing.assert_array_equal(a[cid][field], b[cid][field], err_msg=f"{cid} {field}")


@pytest.fixture
def slurm_env(monkeypatch):
    """Environment of the submitting process, which sbatch hands to the jobs."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("SOUNDSTAGE_SLURM_POLL_SECONDS", "1")
    monkeypatch.delenv("SOUNDSTAGE_TEST_GATES", raising=False)
    return monkeypatch


def _invoke(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _write_pipeline(path, manifest, cache):
    path.write_text(f"""manifest: {manifest}
cache: {cache}
shards: 3
resources: {{time: "00:10:00"}}
stages:
  audio-stats:
    silence-db: -45
  test-loudest:
    offset_db: 1.5
    resources: {{max_parallel: 2}}
  test-mean: {{}}
""")
    return str(path)


@needs_slurm
def test_pipeline_on_slurm_equals_local_run(dataset, tmp_path, slurm_env):
    on_slurm = _write_pipeline(tmp_path / "slurm.yaml", dataset, tmp_path / "cache-slurm")
    local = _write_pipeline(tmp_path / "local.yaml", dataset, tmp_path / "cache-local")

    code, out = _invoke(["run", on_slurm, "--executor", "slurm"])
    assert code == 0, out
    first = out.split("submitted soundstage-audio-stats as job ")[1].split(";")[0]
    for downstream in ("test-loudest", "test-mean"):  # both wait for audio-stats (afterok)
        assert re.search(f"submitted soundstage-{downstream} as job \\d+ \\(after {first}\\)", out), out

    # launched again while those jobs are queued: nothing is submitted twice, --wait waits for them
    code, out = _invoke(["run", on_slurm, "--executor", "slurm", "--wait"])
    assert code == 0, out
    assert "submitted soundstage-" not in out and "still queued or running; not submitted again" in out
    assert out.count("0 failed, 0 missing") == 2 and "test-mean" in out and ": fitted" in out

    code, local_out = _invoke(["run", local, "--executor", "local"])
    assert code == 0, local_out
    for stage, logs in (("audio-stats", "*_*.out"), ("test-loudest", "*_*.out"), ("test-mean", "*.out")):
        (a,) = glob.glob(str(tmp_path / "cache-slurm" / stage / "*"))
        (b,) = glob.glob(str(tmp_path / "cache-local" / stage / "*"))
        assert os.path.basename(a) == os.path.basename(b)  # same fingerprints
        if stage == "test-mean":
            ra, rb = read_result(a), read_result(b)
            for key in ("mean_rms_db", "clips"):
                np.testing.assert_array_equal(ra[key], rb[key])
        else:
            _assert_same_outputs(a, b)
        # logs next to the output: one per array task, one for the whole-dataset job
        assert len(glob.glob(os.path.join(a, "logs", logs))) == (1 if stage == "test-mean" else 3)
        if stage != "test-mean":  # each array task read its planned rows, not the manifest
            (script,) = glob.glob(os.path.join(a, "logs", "*.sbatch"))
            assert "--task-plan" in open(script).read()
            assert len(glob.glob(os.path.join(a, "tasks", "*", "shard-*-of-00003.json"))) == 3
            for log in glob.glob(os.path.join(a, "logs", logs)):
                assert "read the manifest instead" not in open(log).read(), open(log).read()

    code, again = _invoke(["run", on_slurm, "--executor", "slurm", "--wait"])
    assert code == 0 and "nothing to submit" in again and "submitted soundstage-" not in again


@needs_slurm
def test_stages_below_a_recomputed_clip_are_recomputed_in_the_same_submission(tmp_path, slurm_env):
    """One clip's audio changes: audio-stats recomputes it, and in the same submission so do the
    stages below (test-loudest for that clip, test-mean's fit), though they were complete when it
    was submitted. A second launch then has nothing to submit."""
    import soundfile as sf

    manifest = make_synthetic_dataset(str(tmp_path / "synth"), clips=6, seed=5, workers=1)
    pipeline = _write_pipeline(tmp_path / "p.yaml", manifest, tmp_path / "cache")
    code, out = _invoke(["run", pipeline, "--executor", "slurm", "--wait"])
    assert code == 0, out
    row = manifest_rows(manifest)[0][2]
    path = os.path.join(os.path.dirname(manifest), row["audio_path"])
    audio, rate = sf.read(path, dtype="float32")
    sf.write(path, audio * 0.25, rate)  # quieter: other stats, other loudest frame
    (loudest,) = glob.glob(str(tmp_path / "cache" / "test-loudest" / "*"))
    before = open_stage(loudest).digest(row["clip_id"])

    code, out = _invoke(["run", pipeline, "--executor", "slurm", "--wait"])
    assert code == 0, out
    for stage in ("audio-stats", "test-loudest", "test-mean"):
        assert f"submitted soundstage-{stage} as job" in out, out
    assert open_stage(loudest).digest(row["clip_id"]) != before
    code, again = _invoke(["run", pipeline, "--executor", "slurm"])
    assert code == 0 and "nothing to submit" in again, again


def _parts(stage_dir):
    return set(glob.glob(os.path.join(stage_dir, "parts", "*.h5")))


def _wait_until(condition, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@needs_slurm
def test_cancelled_tasks_are_completed_by_a_relaunch_of_only_the_missing_clips(dataset, tmp_path, slurm_env):
    """Shard A's task is cancelled (SIGTERM to every process) while stuck on its 3rd clip; shard
    B's task gets SIGUSR1 (as before a time limit) at its 3rd clip and stops after it. The
    relaunch submits only shards A and B and computes only the clips they had not committed."""
    cache = str(tmp_path / "cache")
    ids = _clip_ids(dataset)
    by_shard = {s: [c for c in ids if shard_of(c, 3) == s] for s in range(3)}
    shard_a, shard_b = sorted(by_shard, key=lambda s: -len(by_shard[s]))[:2]
    assert len(by_shard[shard_a]) >= 4 and len(by_shard[shard_b]) >= 4, by_shard
    gate_a, gate_b = by_shard[shard_a][2], by_shard[shard_b][2]
    fifo = {c: str(tmp_path / f"gate-{c}") for c in (gate_a, gate_b)}
    for path in fifo.values():
        os.mkfifo(path)
    slurm_env.setenv("SOUNDSTAGE_TEST_GATES", ",".join(f"{c}={p}" for c, p in fifo.items()))

    args = [
        "audio-stats",
        "--manifest",
        dataset,
        "--cache",
        cache,
        "--executor",
        "slurm",
        "--shards",
        "3",
        "--workers",
        "1",
        "--batch-size",
        "1",
        "--commit-every",
        "1",
    ]
    code, out = _invoke(args)
    assert code == 0, out
    job = out.split("submitted soundstage-audio-stats as job ")[1].split(";")[0]
    plan = plan_stage(get_stage("audio-stats"), dataset, cache, {})
    committed = lambda: plan.dir.committed_ids() if plan.dir.exists() else set()  # noqa: E731

    _wait_until(lambda: set(by_shard[shard_a][:2]) <= committed(), "shard A's first two clips")
    subprocess.run(["scancel", f"{job}_{shard_a}"], check=True)
    _wait_until(lambda: set(by_shard[shard_b][:2]) <= committed(), "shard B's first two clips")
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_{shard_b}"], check=True)
    time.sleep(2)  # let the signal land (slurmctld -> slurmd -> the task) before the gate opens
    with open(fifo[gate_b], "wb"):
        pass  # opening the gate lets shard B decode its 3rd clip; it commits it and stops
    states = slurm.wait_for_jobs([job], poll_seconds=1, log=lambda *_: None)
    assert states[f"{job}_{shard_a}"] == "CANCELLED"
    assert states[f"{job}_{shard_b}"] == "FAILED"  # exit 1: interrupted, rerun to finish
    assert states[f"{job}_{3 - shard_a - shard_b}"] == "COMPLETED"

    expected_missing = set(by_shard[shard_a][2:]) | set(by_shard[shard_b][3:])
    assert set(ids) - committed() == expected_missing
    log_b = open(os.path.join(plan.dir.path, "logs", f"{job}_{shard_b}.out")).read()
    assert "INTERRUPTED" in log_b and "done 3," in log_b

    slurm_env.delenv("SOUNDSTAGE_TEST_GATES")
    parts_before = _parts(plan.dir.path)
    scripts_before = set(glob.glob(os.path.join(plan.dir.path, "logs", "*.sbatch")))
    code, out = _invoke(args + ["--wait"])
    assert code == 0, out
    assert f"{len(ids)}/{len(ids)} clips committed, 0 failed, 0 missing" in out
    (script,) = set(glob.glob(os.path.join(plan.dir.path, "logs", "*.sbatch"))) - scripts_before
    assert f"#SBATCH --array={slurm.array_spec(sorted([shard_a, shard_b]))}\n" in open(script).read()
    recomputed = [cid for part in _parts(plan.dir.path) - parts_before for cid in _ids_in(part)]
    assert sorted(recomputed) == sorted(expected_missing)

    reference = tmp_path / "reference"
    code, out = _invoke(["audio-stats", "--manifest", dataset, "--cache", str(reference)])
    assert code == 0, out
    _assert_same_outputs(plan.dir.path, glob.glob(str(reference / "audio-stats" / "*"))[0])


def _ids_in(part):
    import h5py

    with h5py.File(part, "r") as h5:
        return set(h5["clip_id"].asstr()[...].tolist())


def _task_processes(job: str, task: int) -> set[int]:
    """Every process of array task ``job_task`` on this node (from its environment in /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"SLURM_ARRAY_JOB_ID") == job.encode() and env.get(b"SLURM_ARRAY_TASK_ID") == str(task).encode():
            found.add(int(entry))
    return found


def _job_state(task_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", task_id], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else ""


@needs_slurm
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the task's processes in /proc")
def test_a_task_whose_node_dies_mid_shard_is_requeued_and_finishes_it_once(dataset, tmp_path, slurm_env):
    """A node dying takes every process of its task at once (no signal to handle): here all of
    them get SIGKILL while the task is on its 3rd clip, and the task is requeued under the same id
    (``scontrol requeue``, as SLURM does for a failed node). The rerun finishes the shard: every
    clip is committed exactly once, none is lost, and the output equals a local run's."""
    import threading

    cache = str(tmp_path / "cache")
    ids = _clip_ids(dataset)
    by_shard = {s: [c for c in ids if shard_of(c, 2) == s] for s in range(2)}
    shard = max(by_shard, key=lambda s: len(by_shard[s]))
    assert len(by_shard[shard]) >= 4, by_shard
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    slurm_env.setenv("SOUNDSTAGE_TEST_GATES", f"{by_shard[shard][2]}={gate}")
    options = "--shards 2 --workers 1 --batch-size 1 --commit-every 1".split()
    code, out = _invoke(["audio-stats", "--manifest", dataset, "--cache", cache, "--executor", "slurm", *options])
    assert code == 0, out
    job = out.split("submitted soundstage-audio-stats as job ")[1].split(";")[0]
    plan = plan_stage(get_stage("audio-stats"), dataset, cache, {})
    committed = lambda: plan.dir.committed_ids() if plan.dir.exists() else set()  # noqa: E731
    _wait_until(lambda: set(by_shard[shard][:2]) <= committed(), "the task's first two clips")

    victims = _task_processes(job, shard)
    assert len(victims) >= 2, victims  # the batch shell, the stage, its decoding worker...
    for pid in victims:
        os.kill(pid, 9)
    _wait_until(lambda: _job_state(f"{job}_{shard}") not in ("RUNNING", "COMPLETING", ""), "the task to end")
    subprocess.run(["scontrol", "requeue", f"{job}_{shard}"], check=True)
    # slurmctld makes a requeued job eligible 2 minutes later; the test does not wait for that, but
    # not the same second either (the old run's credential is revoked in whole seconds)
    subprocess.run(["scontrol", "update", f"JobId={job}_{shard}", "StartTime=now+2"], check=True)
    opener = threading.Thread(target=lambda: open(gate, "wb").close(), daemon=True)
    opener.start()  # the rerun passes the 3rd clip
    slurm.wait_for_jobs([job], poll_seconds=1, log=lambda *_: None)
    opener.join(timeout=5)

    assert committed() == set(ids)  # nothing lost
    rows = [cid for part in _parts(plan.dir.path) for cid in _ids_in(part)]
    assert sorted(rows) == sorted(ids)  # nothing twice
    code, out = _invoke(["verify", "--cache", cache])
    assert code == 0, out
    reference = tmp_path / "reference"
    slurm_env.delenv("SOUNDSTAGE_TEST_GATES")
    code, out = _invoke(["audio-stats", "--manifest", dataset, "--cache", str(reference), "--workers", "0"])
    assert code == 0, out
    _assert_same_outputs(plan.dir.path, glob.glob(str(reference / "audio-stats" / "*"))[0])
