"""Training on several processes (DDP, gloo on CPU) and as a SLURM job.

A 2-process run with batch B equals a 1-process run with batch 2B (loss curve, evaluation,
final weights) up to float rounding — both in float64: over a run, AdamW turns float32 rounding
of near-zero gradient elements into weight steps, and then a ReLU on that noise (docs/cluster.md); a run whose rank was killed resumes and ends as the
uninterrupted one; the sbatch script is checked line by line; and (with ``sbatch`` on PATH) a
real job on the single-node SLURM is stopped with ``scancel --signal=USR1``, requeues itself and
ends equal to the local run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fixtures_synth import synth_dir  # noqa: F401
from safetensors.torch import load_file
from test_train import config, vggish_cache  # noqa: F401

from soundstage.models.avs_mask2former import AVSMask2Former, class_scores
from soundstage.train import assemble
from soundstage.train.config import resolve_config
from soundstage.train.data import collate_frames
from soundstage.train.evaluation import model_inputs
from soundstage.train.launch import launch
from soundstage.train.loop import train
from soundstage.train.recipes.generic import targets

# 12 synthetic clips, 6 in train: 2 steps of 4 + 2 clips per epoch; evaluation on val after each
SETTINGS = {"epochs": 2, "lr": 2e-3, "probes": ["zeroed"], "checkpoint_every": 1, "precision": "fp64"}


def weights(run) -> dict:
    return load_file(os.path.join(run, "model", "last", "model.safetensors"))


def records(run, name: str) -> list[dict]:
    with open(os.path.join(run, "metrics", name)) as f:
        return [json.loads(line) for line in f]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "soundstage.cli", "train", *map(str, args)]


def cli_options(vggish_cache, out, batch_size: int) -> list:  # noqa: F811
    return [
        "--manifest", vggish_cache["manifest"], "--cache", vggish_cache["cache"], "--out", out,
        "--threads", 1, "--batch-size", batch_size, "--lr", SETTINGS["lr"], "--epochs", SETTINGS["epochs"],
        "--probes", ",".join(SETTINGS["probes"]), "--checkpoint-every", 1, "--precision", SETTINGS["precision"], "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(vggish_cache, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("ddp") / "one")
    reference = config(vggish_cache, out, **{**SETTINGS, "batch_size": 4, "split_invariant_loss": True})
    train(reference, log=lambda *_: None, progress=False)
    return out


@pytest.fixture(scope="module")
def two_processes(vggish_cache, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("ddp") / "two")
    code = launch(config(vggish_cache, out, **{**SETTINGS, "batch_size": 2}), 2, quiet=True)
    assert code == 0
    return out


def test_two_processes_equal_one_process_with_the_same_global_batch(one_process, two_processes, vggish_cache):  # noqa: F811
    one, two = records(one_process, "steps.jsonl"), records(two_processes, "steps.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for name in ("loss", "loss_class", "loss_mask", "loss_dice"):  # the parts too: summed over the ranks
        np.testing.assert_allclose([r[name] for r in two], [r[name] for r in one], rtol=1e-4, err_msg=name)

    # final weights: equal, except those whose gradient is zero by construction (a bias ahead of
    # a GroupNorm, an attention key bias): Adam turns the rounding noise of a zero gradient into
    # full steps, which change nothing downstream — so the outputs are compared as well
    cfg = config(vggish_cache, one_process, **SETTINGS)
    cues = assemble.open_cues(cfg, log=lambda *_: None)
    m1, m2 = (AVSMask2Former.from_pretrained(os.path.join(run, "model", "last")) for run in (one_process, two_processes))
    train_set = assemble.dataset(cfg, cues, "train", num_queries=m1.config.num_queries, training=True)
    free = gradient_free(m1, collate_frames([train_set[i] for i in range(4)]))
    params2 = dict(m2.named_parameters())
    compared = 0
    for name, p1 in m1.named_parameters():
        if name not in free:
            np.testing.assert_allclose(params2[name].detach(), p1.detach(), rtol=1e-4, atol=5e-5, err_msg=name)
            compared += 1
    assert compared > 150 and len(free) < 20, (compared, sorted(free))
    val = collate_frames([assemble.dataset(cfg, cues, "val", num_queries=m1.config.num_queries)[i] for i in range(2)])
    with torch.no_grad():
        s1, s2 = (class_scores(m.eval()(**model_inputs(val, "cpu")), (32, 32)) for m in (m1, m2))
    np.testing.assert_allclose(s2, s1, atol=1e-4)

    # the evaluation is split over the ranks and its totals summed: the same numbers
    for e1, e2 in zip(records(one_process, "epochs.jsonl"), records(two_processes, "epochs.jsonl"), strict=True):
        for variant in ("real", "zeroed"):
            for metric in ("miou", "fscore"):
                assert e2["eval"][variant][metric] == pytest.approx(e1["eval"][variant][metric], abs=1e-5)
            assert e2["eval"][variant]["frames"] == e1["eval"][variant]["frames"]
    with open(os.path.join(two_processes, "config.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_evaluation_split_over_ranks_equals_one_process(tmp_path):
    """Every protocol kind, including one scored per batch of 4 videos (segpref): 11 videos of 5
    frames split over 2 gloo ranks, totals summed == one process scoring all of them."""
    import ddp_metrics_rank

    from soundstage.train.distributed import Distributed
    from soundstage.train.launch import free_port

    g = torch.Generator().manual_seed(0)
    data = {
        "binary_pred": torch.randn(11, 5, 16, 16, generator=g) * 3,
        "binary_gt": (torch.rand(11, 5, 16, 16, generator=g) > 0.6).long(),
        "semantic_pred": torch.randn(11, 5, 4, 16, 16, generator=g) * 3,
        "semantic_gt": torch.randint(0, 4, (11, 5, 16, 16), generator=g),
    }
    data["binary_gt"][3] = 0  # a video without foreground
    torch.save(data, tmp_path / "data.pt")
    out = str(tmp_path / "two.json")
    torch.multiprocessing.spawn(ddp_metrics_rank.rank_main, args=(2, free_port(), str(tmp_path / "data.pt"), out), nprocs=2)
    with open(out) as f:
        two = json.load(f)
    for protocol in ddp_metrics_rank.PROTOCOLS:
        one = ddp_metrics_rank.score(protocol, data, Distributed())
        for key, value in one.items():
            if isinstance(value, (int, float)):
                assert two[protocol][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (protocol, key)


def gradient_free(model, batch) -> set[str]:
    """Parameters whose gradient on ``batch`` is zero up to rounding (1e-6 of the largest)."""
    model.train()
    mask_labels, class_labels = targets(batch["labels"], "cpu")
    model(**model_inputs(batch, "cpu"), mask_labels=mask_labels, class_labels=class_labels).loss.backward()
    grads = {n: 0.0 if p.grad is None else float(p.grad.abs().max()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    largest = max(grads.values())
    return {n for n, g in grads.items() if g <= 1e-6 * largest}


def test_killed_rank_then_relaunch_resumes_and_equals_the_uninterrupted_run(two_processes, vggish_cache, tmp_path):  # noqa: F811
    out = str(tmp_path / "killed")
    command = cli(*cli_options(vggish_cache, out, 2), "--nproc", 2)
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps = os.path.join(out, "metrics", "steps.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(steps) and len(open(steps).read().splitlines()) >= 2):
        assert launcher.poll() is None, launcher.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    rank = _children(launcher.pid)[-1]
    os.killpg(rank, signal.SIGKILL)  # one rank's process group, mid-run
    output = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert "rank 1 was killed by SIGKILL" in output
    assert not os.path.exists(os.path.join(out, "DONE"))

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    a, b = weights(two_processes), weights(out)
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert [r["step"] for r in records(out, "steps.jsonl")] == [1, 2, 3, 4]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# ------------------------------------------------------------------------------------ SLURM

needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="sbatch not on PATH: no SLURM here (CI starts one with .ci/slurm/start.sh)"
)


def test_sbatch_script_of_a_multi_node_gpu_training(vggish_cache, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from soundstage.cli import main

    out = str(tmp_path / "runs" / "big")
    args = ["train", "--manifest", vggish_cache["manifest"], "--cache", vggish_cache["cache"], "--out", out]
    args += ["--batch-size", "2", "--text-cues", "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "4"]
    args += ["--partition", "gpu", "--time", "24:00:00", "--mem", "64G", "--account", "lab", "--qos", "long", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("# sbatch --parsable ") and lines[0].endswith(".sbatch")
    assert lines[1:3] == ["#!/bin/bash", f"# soundstage train: run directory {out}"]
    assert "# 2 node(s) x 4 process(es) = 8 DDP rank(s) (NCCL); global batch = 2 x 1 x 8 clips" in lines
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        f"#SBATCH --output={out}/slurm/%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --job-name=soundstage-train-big",
        f"#SBATCH --chdir={os.getcwd()}",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=long",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --mem=64G",
        "#SBATCH --time=24:00:00",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
    ]
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun == (
        f"srun --kill-on-bad-exit=1 {sys.executable} -m soundstage.cli train --out {out} --manifest {vggish_cache['manifest']} "
        f"--cache {vggish_cache['cache']} --text-cues --batch-size 2 "
        '--nproc 4 --nnodes 2 --master-addr "$head" --master-port "$port" --quiet &'
    )
    assert 'trap \'echo "USR1: asking the tasks to save and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"\' USR1' in lines
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert lines[-8:] == [
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; status=$?',
        'if [ "$status" -eq 75 ]; then',
        '    echo "stopped with its state saved: requeueing job $SLURM_JOB_ID, $(date)"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$status"',
    ]
    assert not os.path.exists(out)  # a dry run writes nothing
    result = CliRunner().invoke(main, [*args[:-1], "--nproc", "2"])
    assert result.exit_code != 0 and "--nproc and --gpus-per-node disagree" in result.output


def test_pipeline_train_step_is_submitted_after_the_stage_jobs(vggish_cache, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from soundstage.cli import main

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"manifest: {vggish_cache['manifest']}\ncache: {tmp_path / 'cache'}\n"
        f"stages:\n  vggish:\n    checkpoint: {vggish_cache['checkpoint']}\n"
        "train:\n  out: runs/avs\n  audio: vggish\n  epochs: 3\n"
        "  step: {nodes: 1, nproc: 2, cpus_per_node: 2, time: '01:00:00'}\n"
    )
    result = CliRunner().invoke(main, ["run", str(pipeline), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 0, result.output
    stage_line = next(line for line in result.output.splitlines() if line.startswith("# --- soundstage-vggish"))
    train_line = next(line for line in result.output.splitlines() if line.startswith("# --- train: "))
    assert result.output.index(stage_line) < result.output.index(train_line)
    assert "--dependency=afterok:<soundstage-vggish>" in train_line
    train_script = result.output[result.output.index(train_line) :]
    assert f"srun --kill-on-bad-exit=1 {sys.executable} -m soundstage.cli train --config {pipeline} --nproc 2" in train_script
    assert "#SBATCH --cpus-per-task=2" in train_script and "#SBATCH --time=01:00:00" in train_script
    assert f"#SBATCH --output={os.path.abspath('runs/avs')}/slurm/%j.out" in train_script
    # soundstage train --config ignores the step: mapping
    assert resolve_config(str(pipeline), {}).epochs == 3


@needs_slurm
def test_slurm_job_stopped_with_usr1_requeues_and_equals_the_local_run(two_processes, vggish_cache, tmp_path):  # noqa: F811
    out = str(tmp_path / "runs" / "slurm")
    command = cli(*cli_options(vggish_cache, out, 2), "--executor", "slurm", "--nproc", 2, "--cpus-per-node", 2, "--wait")
    env = {**os.environ, "SOUNDSTAGE_SLURM_POLL_SECONDS": "1"}
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while not _job_log_says(out, "using the only vggish output"):  # the ranks are up, before the loop
        assert follower.poll() is None, follower.stdout.read()
        assert time.time() < deadline, "the job did not start training within 5 minutes"
        time.sleep(0.2)
    (log,) = [name for name in os.listdir(os.path.join(out, "slurm")) if name.endswith(".out")]
    job_id = log[: -len(".out")]
    # as SLURM does before a time limit; before the first step, so the run cannot end first: the
    # signal waits for the loop, which stops after step 1
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    release_when_requeued(job_id, follower)
    output = follower.communicate(timeout=600)[0]
    assert follower.returncode == 0, output
    with open(os.path.join(out, "slurm", log)) as f:
        job_log = f.read()
    assert "requeueing job" in job_log and "resuming" in job_log, job_log
    assert "run 1," in job_log  # the requeued run
    a, b = weights(two_processes), weights(out)
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert [r["step"] for r in records(out, "steps.jsonl")] == [1, 2, 3, 4]
    assert "stopped by SIGUSR1 at step 1" in job_log


@needs_slurm
def test_requeue_script_passes_the_time_limit_signal_from_the_batch_shell_to_the_tasks(tmp_path):
    """The time-limit path: ``--signal=B:USR1@120`` signals the batch shell only (``scancel
    --batch`` here); its trap must pass USR1 to the task, whose 75 makes the job requeue itself."""
    from soundstage.pipeline import slurm

    ready = tmp_path / "ready"
    task = (
        "import os, signal, sys, time\n"
        "if int(os.environ.get('SLURM_RESTART_COUNT', '0')):\n"
        "    print('second run'); sys.exit(0)\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(120); sys.exit(1)\n"
    )
    job = slurm.SlurmJob(
        name="soundstage-requeue-test",
        command=[],
        log_dir=str(tmp_path / "logs"),
        workdir=str(tmp_path),
        resources=slurm.Resources(cpus=1, time="00:05:00", extra=["--nodes=1", "--ntasks-per-node=1"]),
    )
    os.makedirs(job.log_dir)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_requeue_script(job, slurm.shell_command([sys.executable, "-c", task])))
    job_id = slurm.submit_script(str(script))
    deadline = time.time() + 120
    while not ready.exists():
        assert time.time() < deadline, "the task did not start"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    waiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        release_when_requeued(job_id, waiter, timeout=120)
    finally:
        waiter.kill()
    slurm.wait_for_jobs([job_id], poll_seconds=0.5, log=lambda *_: None)
    log = (tmp_path / "logs" / f"{job_id}.out").read_text()
    assert "USR1: asking the tasks to save and stop" in log
    assert "requeueing job" in log and "run 1," in log and "second run" in log, log


def _job_log_says(run: str, text: str) -> bool:
    folder = os.path.join(run, "slurm")
    logs = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".out")] if os.path.isdir(folder) else []
    return any(text in open(path).read() for path in logs)


def release_when_requeued(job_id: str, follower, timeout: float = 300) -> None:
    """SLURM holds a requeued job back for a while (pending, reason BeginTime); start it now
    rather than let the test wait. Not in the second of the requeue: slurmctld revokes the old
    run's credential at that time, in whole seconds, and kills a start in the same second ("Job
    credential revoked")."""
    deadline = time.time() + timeout
    while follower.poll() is None and time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout.strip()
        if queue == "PENDING|BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], check=True)
            return
        time.sleep(0.5)
