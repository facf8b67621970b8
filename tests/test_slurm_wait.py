"""`--wait` never hangs silently: the pending reason is shown, a job SLURM says can never run is
cancelled with a clear message, and a stage's default resources are cut to the partition."""

import subprocess

from test_slurm import SITE, _invoke, dataset, needs_slurm, slurm_env  # noqa: F401 (fixtures)

from soundstage.pipeline import slurm


def test_waiting_shows_each_state_with_its_reason():
    states = {
        "7_1": ("PENDING", "Resources"),
        "7_2": ("PENDING", "Resources"),
        "7_3": ("RUNNING", "None"),
        "8": ("PENDING", "Dependency"),
    }
    assert slurm._count_states(states) == "1 pending (Dependency), 2 pending (Resources), 1 running"


def test_partition_limits_and_units():
    assert slurm._gpu_count("gpu:a100:4(S:0-1),shard:8") == 4 and slurm._gpu_count("(null)") == 0
    assert slurm.mem_mb("32G") == 32768 and slurm.mem_mb("1T") == 1024**2 and slurm.mem_mb(500) == 500
    assert slurm._time_minutes("1-02:00:00") == 26 * 60 and slurm._time_minutes("30:00") == 30


@needs_slurm
def test_a_job_that_can_never_run_is_cancelled_with_its_reason(dataset, tmp_path, slurm_env):  # noqa: F811
    limits = slurm.partition_limits()
    code, out = _invoke(
        [
            "audio-stats",
            "--manifest",
            dataset,
            "--cache",
            str(tmp_path / "c"),
            "--executor",
            "slurm",
            "--cpus",
            str(limits.cpus * 8),
            "--wait",
        ]
    )
    assert code == 1, out
    assert "warning: asks for more than partition" in out and f"cpus {limits.cpus * 8}" in out
    error = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "can never run" in error[0] and "Partition" in error[0], out
    job = out.split("submitted soundstage-audio-stats as job ")[1].split(";")[0]
    left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
    assert not [s for s in left if s not in slurm.FINISHED_STATES]  # cancelled, not left pending


@needs_slurm
def test_default_resources_are_fitted_to_the_partition_and_the_job_runs(dataset, tmp_path, slurm_env):  # noqa: F811
    limits = slurm.partition_limits()
    code, out = _invoke(["test-hungry", "--manifest", dataset, "--cache", str(tmp_path / "c"), "--executor", "slurm", "--wait"])
    assert code == 0, out
    assert f"test-hungry: default resources fitted to partition {limits.name}" in out, out
    assert f"cpus 64 -> {limits.cpus}" in out and f"mem 1T -> {limits.mem_mb}M" in out
    script = open(next(p for p in (tmp_path / "c").rglob("*.sbatch"))).read()
    assert f"--cpus-per-task={limits.cpus}" in script and (limits.gpus or "--gres" not in script)


def test_without_slurm_defaults_stay_as_declared(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo here, whether or not this machine has SLURM
    assert slurm.fit_defaults({"cpus": 64}, {}) == {"cpus": 64}
