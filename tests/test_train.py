"""The training stage on the synthetic dataset with the tiny Mask2Former and the tiny VGGish cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures_synth import synth_dir  # noqa: F401
from PIL import Image
from safetensors.torch import load_file

from soundstage.cache.reader import MissingClip
from soundstage.manifests.table import read_manifest, write_manifest
from soundstage.models.avs_mask2former import AVSMask2Former, build_model
from soundstage.models.tiny import build_vggish
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.runner import run_stage
from soundstage.train import assemble
from soundstage.train.checkpoint import EpochSampler
from soundstage.train.config import resolve_config
from soundstage.train.cues import CueSpec, collate_ragged, open_cue, pipeline_output, select_output
from soundstage.train.data import AVSClips
from soundstage.train.probes import silence_cue

FAST = {"threads": 1, "batch_size": 2, "lr": 1e-3, "probes": []}


@pytest.fixture(scope="module")
def vggish_cache(synth_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("train")
    checkpoint = build_vggish(str(root / "vggish.pth"))
    cache = str(root / "cache")
    manifest = os.path.join(synth_dir, "manifest.csv")
    summary = run_stage(
        get_stage("vggish"), manifest, cache, {"checkpoint": checkpoint}, workers=0, progress=False, log=lambda *_: None
    )
    assert not summary.failed
    return {"manifest": manifest, "cache": cache, "stage_dir": summary.path, "checkpoint": checkpoint, "root": root}


def config(vggish_cache, out, **settings):
    return resolve_config(
        None, {"manifest": vggish_cache["manifest"], "cache": vggish_cache["cache"], "out": str(out), **FAST, **settings}
    )


def raw_field(stage_dir: str, clip_id: str, field: str) -> np.ndarray:
    """A clip's rows read straight from the HDF5 part files (clip ids, offsets, concatenated data)."""
    parts = os.path.join(stage_dir, "parts")
    for name in sorted(os.listdir(parts)):
        if not name.endswith(".h5") or name.startswith("."):
            continue
        with h5py.File(os.path.join(parts, name), "r") as h5:
            ids = list(h5["clip_id"].asstr()[...])
            if clip_id in ids:
                row = ids.index(clip_id)
                start, stop = h5[f"offsets/{field}"][row : row + 2]
                return h5[field][start:stop]
    raise AssertionError(f"{clip_id} not in {stage_dir}")


# ------------------------------------------------------------------------------------ data


def test_dataset_items_equal_independent_reads(vggish_cache, tmp_path):
    from transformers import Mask2FormerImageProcessorPil as Mask2FormerImageProcessor

    cfg = config(vggish_cache, tmp_path / "run")
    cues = assemble.open_cues(cfg, log=lambda *_: None)
    data = AVSClips(cfg.manifest, "val", cues, image_size=64, mask_size=48, task="binary")
    processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64}, do_resize=True)
    stage_dir = vggish_cache["stage_dir"]
    for index, row in enumerate(data.rows):
        item = data[index]
        clip_dir = os.path.join(os.path.dirname(cfg.manifest), row["subset"], row["clip_id"])
        frames = sorted(int(f[:-4]) for f in os.listdir(os.path.join(clip_dir, "frames")))
        assert item["frames"].tolist() == frames  # val: every frame annotated
        images = [Image.open(os.path.join(clip_dir, "frames", f"{i}.jpg")).convert("RGB") for i in frames]
        expected = processor(images=images, return_tensors="pt")["pixel_values"]
        assert torch.allclose(item["pixel_values"], expected, atol=2e-2)  # the processor's own resize/normalise
        for i in frames:
            label = Image.open(os.path.join(clip_dir, "labels_semantic", f"{i}.png")).resize((48, 48), Image.NEAREST)
            assert np.array_equal(item["labels"][i].numpy(), (np.asarray(label) != 0).astype(np.int64))
        assert np.array_equal(item["audio"].numpy(), raw_field(stage_dir, row["clip_id"], "embeddings")[frames])


def test_v1s_train_policy_first_or_repeat(vggish_cache, tmp_path):
    cfg = config(vggish_cache, tmp_path / "run")
    cues = assemble.open_cues(cfg, log=lambda *_: None)
    rows = read_manifest(cfg.manifest)
    clip = rows[(rows["subset"] == "v1s") & (rows["split"] == "train")].iloc[0]["clip_id"]
    first = AVSClips(cfg.manifest, "train", cues, 64, unlabelled="first")
    repeat = AVSClips(cfg.manifest, "train", cues, 64, unlabelled="repeat")
    a, b = first[first.clip_ids.index(clip)], repeat[repeat.clip_ids.index(clip)]
    assert a["frames"].tolist() == [0] and b["frames"].tolist() == [0] * 5
    assert torch.equal(b["pixel_values"][4], a["pixel_values"][0]) and torch.equal(b["labels"][3], a["labels"][0])
    raw = raw_field(vggish_cache["stage_dir"], clip, "embeddings")
    assert np.array_equal(b["audio"].numpy(), raw[:5])  # each repeated frame keeps its own second's cue


def test_missing_cache_clip_is_an_error_naming_it(vggish_cache, tmp_path):
    df = read_manifest(vggish_cache["manifest"])
    df.loc[df.index[df["split"] == "train"][-1], "clip_id"] = "ghost_clip_42"
    manifest = os.path.join(os.path.dirname(vggish_cache["manifest"]), "manifest_with_ghost.csv")
    write_manifest(df, manifest)
    cfg = config(vggish_cache, tmp_path / "run", manifest=manifest)
    cues = assemble.open_cues(cfg, log=lambda *_: None)
    with pytest.raises(MissingClip, match="ghost_clip_42"):
        AVSClips(manifest, None, cues, 64)
    result = CliRunner().invoke(
        _cli(),
        [
            "train",
            "--manifest",
            manifest,
            "--cache",
            vggish_cache["cache"],
            "--out",
            str(tmp_path / "cli"),
            "--quiet",
            "--epochs",
            "1",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 1 and "ghost_clip_42" in result.output and "Traceback" not in result.output


def test_selection_api_and_ragged_collate(vggish_cache, tmp_path):
    by_params = select_output(vggish_cache["cache"], "vggish", "pad=repeat-last", log=lambda *_: None)
    assert by_params.path == vggish_cache["stage_dir"]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"manifest: {vggish_cache['manifest']}\ncache: {vggish_cache['cache']}\n"
        f"stages:\n  vggish:\n    checkpoint: {vggish_cache['checkpoint']}\n"
        "train:\n  epochs: 3\n  audio: vggish\n  lr: 0.002\n"
    )
    assert pipeline_output(str(pipeline), "vggish").path == vggish_cache["stage_dir"]
    cfg = resolve_config(str(pipeline), {"out": str(tmp_path / "run"), "lr": 0.005})
    assert (cfg.epochs, cfg.lr, cfg.cache) == (3, 0.005, vggish_cache["cache"])  # options over the file
    reader = open_cue(CueSpec("audio", "vggish", "embeddings"), stage_dir=by_params.path)
    values, valid = collate_ragged([reader[c]["embeddings"] for c in list(reader)[:4]])
    lengths = [len(reader[c]["embeddings"]) for c in list(reader)[:4]]
    assert values.shape == (4, max(lengths), 128) and valid[:, :, 0].sum(1).tolist() == lengths


def test_muted_cue_is_the_stage_output_for_a_silent_clip(vggish_cache, tmp_path):
    import soundfile as sf

    df = read_manifest(vggish_cache["manifest"]).iloc[:1].copy()
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(5 * 16000, dtype=np.int16), 16000, subtype="PCM_16")
    df["audio_path"], df["num_frames"] = str(silent), "5"
    manifest = str(tmp_path / "silent.csv")
    write_manifest(df, manifest)
    summary = run_stage(
        get_stage("vggish"),
        manifest,
        str(tmp_path / "cache"),
        {"checkpoint": vggish_cache["checkpoint"]},
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    expected = raw_field(summary.path, df.iloc[0]["clip_id"], "embeddings")
    assert np.array_equal(silence_cue(vggish_cache["stage_dir"], "embeddings", 5), expected)


# ------------------------------------------------------------------------------------ model


def test_audio_conditioning_changes_the_output_and_masked_text_is_ignored():
    torch.manual_seed(0)
    pixels, audio = torch.randn(3, 3, 64, 64), torch.randn(3, 16)
    for mode in ("add", "cosine"):
        model = build_model(None, 2, mode, 16).eval()
        with torch.no_grad():
            real = model(pixels, audio=audio).masks_queries_logits
            zeroed = model(pixels, audio=torch.zeros_like(audio)).masks_queries_logits
            again = model(pixels, audio=audio).masks_queries_logits
        assert torch.equal(real, again) and not torch.allclose(real, zeroed)
    model = build_model(None, 2, "add", 16, text_dim=8).eval()
    text, mask = torch.randn(3, 4, 8), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    changed = text.clone()
    changed[~mask] = 100.0  # masked slots' content must not matter
    active = torch.zeros(3, model.config.num_queries)
    active[:, :2] = 1
    with torch.no_grad():
        a = model(pixels, audio=audio, text=text, text_mask=mask).masks_queries_logits
        b = model(pixels, audio=audio, text=changed, text_mask=mask).masks_queries_logits
        c = model(pixels, audio=audio, text=text * 2, text_mask=mask).masks_queries_logits
        d = model(pixels, audio=audio, active=active, text=text, text_mask=mask).masks_queries_logits
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c) and not torch.allclose(a, d)


def test_save_load_through_save_pretrained(tmp_path):
    model = build_model(None, 71, "cosine", 16, text_dim=8).eval()
    model.conditioner.set_audio_statistics(torch.randn(20, 16) * 3 + 1)
    model.save_pretrained(str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "avs_conditioning.pt").exists()
    loaded = AVSMask2Former.from_pretrained(str(tmp_path / "m")).eval()
    inputs = {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "audio": torch.randn(2, 16),
        "text": torch.randn(2, 4, 8),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
    }
    with torch.no_grad():
        assert torch.equal(model(**inputs).masks_queries_logits, loaded(**inputs).masks_queries_logits)
    assert loaded.config.num_labels == 71


def test_sampler_resumes_part_way_into_an_epoch():
    full = EpochSampler(10, seed=3)
    full.set_epoch(2)
    tail = EpochSampler(10, seed=3)
    tail.set_epoch(2, start=4)
    assert list(tail) == list(full)[4:] and sorted(full) == list(range(10))


# ------------------------------------------------------------------------------------ training


def _cli():
    from soundstage.cli import main

    return main


RUN = {"epochs": 3, "probes": ["muted", "zeroed", "swapped", "noise:10"], "checkpoint_every": 1}


def _command(vggish_cache, out) -> list[str]:
    """The command line of ``config(vggish_cache, out, **RUN)``."""
    return [
        sys.executable,
        "-m",
        "soundstage.cli",
        "train",
        "--manifest",
        vggish_cache["manifest"],
        "--cache",
        vggish_cache["cache"],
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--checkpoint-every",
        "1",
        "--probes",
        ",".join(RUN["probes"]),
        "--quiet",
    ]


def _steps_done(out) -> int:
    path = os.path.join(out, "checkpoints", "latest.pt")
    try:
        return torch.load(path, weights_only=True)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.fixture(scope="module")
def whole_run(vggish_cache):
    """An uninterrupted run: 3 epochs of 3 steps, evaluated with every probe after each epoch."""
    from soundstage.train.loop import train

    out = vggish_cache["root"] / "whole"
    record = train(config(vggish_cache, out, **RUN), log=lambda *_: None, progress=False)
    return out, record


def test_loss_goes_down_and_the_run_directory_is_complete(whole_run, vggish_cache):
    run, record = whole_run
    losses = [json.loads(line)["loss"] for line in (run / "metrics" / "steps.jsonl").read_text().splitlines()]
    assert len(losses) == 9 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert set(record["eval"]) == {"real", "muted", "zeroed", "swapped", "noise:10"}
    assert record["eval"]["real"]["clips"] == 3 and record["gap_real_muted"]["miou"] is not None
    assert len((run / "metrics" / "epochs.jsonl").read_text().splitlines()) == 3
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["cues"]["audio"]["path"] == vggish_cache["stage_dir"]
    assert provenance["cues"]["audio"]["params"]["checkpoint"] == vggish_cache["checkpoint"]
    for name in (
        "config.json",
        "curves.png",
        "DONE",
        "checkpoints/latest.pt",
        "model/last/model.safetensors",
        "model/last/avs_conditioning.pt",
        "model/best/model.safetensors",
    ):
        assert (run / name).exists(), name
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 9 and set(state["rng"]) >= {"python", "numpy", "torch"}
    result = CliRunner().invoke(_cli(), ["evaluate", "--run", str(run), "--split", "val", "--weights", "last", "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.strip().splitlines()[-1])
    assert scored["miou"] == pytest.approx(record["eval"]["real"]["miou"])
    assert {"miou", "fscore", "protocol", "split", "audio", "clips"} <= set(scored)
    zeroed = CliRunner().invoke(_cli(), ["evaluate", "--run", str(run), "--split", "val", "--audio", "zeroed", "--json"])
    assert json.loads(zeroed.output.strip().splitlines()[-1])["audio"] == "zeroed"


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] read back from the run's event files by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_step_evaluation_and_frame(whole_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = whole_run
    steps = [json.loads(line) for line in (run / "metrics" / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run / "metrics" / "epochs.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run)
    for name in ("loss", "loss_class", "loss_mask", "loss_dice", "lr", "grad_norm", "clips_per_s", "step_seconds"):
        assert scalars[f"train/{name}"] == [(r["step"], pytest.approx(r[name])) for r in steps], name
    for r in steps:  # the parts are transformers' weighted terms: they add up to the loss
        assert r["loss_class"] + r["loss_mask"] + r["loss_dice"] == pytest.approx(r["loss"], rel=1e-5)
        assert r["clips_per_s"] == pytest.approx(2 / r["step_seconds"], rel=0.01)  # 2 clips per step
    for protocol in ("avsbench-binary", "bias-in-avs", "stepping-stones", "segpref"):
        real = [(e["step"], e["eval"]["real"]["protocols"][protocol]["miou"]) for e in epochs]
        muted = [(e["step"], e["eval"]["muted"]["protocols"][protocol]["miou"]) for e in epochs]
        assert scalars[f"val/{protocol}/miou"] == [(s, pytest.approx(v)) for s, v in real]
        assert scalars[f"val/{protocol}/noise_10/fscore"]
        gap = scalars[f"val/{protocol}/real-muted/miou"]
        assert gap == [(s, pytest.approx(a - b, abs=1e-6)) for (s, a), (_, b) in zip(real, muted)]
    assert [v for _, v in scalars["val/avsbench-binary/miou"]] == pytest.approx([e["eval"]["real"]["miou"] for e in epochs])
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    frames = [tag for tag in events.Tags()["images"] if tag.startswith("val/frames/")]
    assert len(frames) == 3 and len(events.Images(frames[0])) == 3  # the 3 val clips, at each evaluation
    image = events.Images(frames[0])[0]
    assert (image.width, image.height) == (128, 128)  # the report's display size


def test_wandb_offline_and_mlflow_file_store_get_each_step_once_across_a_resume(whole_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from soundstage.train.run_dir import RunDir
    from soundstage.train.tracking import Tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(str(tmp_path / "tracked"))
    steps, epochs = RunDir(str(whole_run[0])).records("steps.jsonl"), RunDir(str(whole_run[0])).records("epochs.jsonl")
    frame = {"val/frames/clip": np.full((8, 8, 3), 200, np.uint8)}
    first = Tracking(["wandb", "mlflow"], run, {"lr": 1e-3})
    for record in steps[:5]:  # "killed" after step 5; the checkpoint was at step 3
        first.step(record)
    first.evaluation(epochs[0], frame)
    first.close()
    resumed = Tracking(["wandb", "mlflow"], run, {"lr": 1e-3}, resume_step=3)
    for record in steps[3:]:
        resumed.step(record)
    for record in epochs:
        resumed.evaluation(record, frame)
    resumed.close()

    state = json.loads((tmp_path / "tracked" / "tracking.json").read_text())
    client = MlflowClient(state["mlflow"]["uri"])
    history = client.get_metric_history(state["mlflow"]["run_id"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    miou = client.get_metric_history(state["mlflow"]["run_id"], "val/avsbench-binary/real-muted/miou")
    expected = [(e["step"], e["eval"]["real"]["miou"] - e["eval"]["muted"]["miou"]) for e in epochs]
    assert sorted((m.step, m.value) for m in miou) == [(s, pytest.approx(v, abs=1e-6)) for s, v in expected]
    assert client.get_run(state["mlflow"]["run_id"]).data.params["lr"] == "0.001"
    # the resumed process writes a second offline folder of the same run id (`wandb sync` joins them)
    folders = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    # one run id resumed; two starts in the same second get a folder name with a suffix after the id
    assert len(folders) == 2 and all(state["wandb"]["id"] in f.name for f in folders), folders
    logged = b"".join(p.read_bytes() for f in folders for p in f.glob("*.wandb"))
    assert b"train/loss_dice" in logged and b"val/stepping-stones/real-swapped/fscore" in logged
    assert state["sent"] == {"train": steps[-1]["step"], "eval": epochs[-1]["step"]}


def test_best_model_is_the_best_evaluation_and_evaluate_loads_it(whole_run):
    run, record = whole_run
    epochs = [json.loads(line) for line in (run / "metrics" / "epochs.jsonl").read_text().splitlines()]
    values = [e["eval"]["real"]["miou"] for e in epochs]
    best = json.loads((run / "model" / "best" / "best.json").read_text())
    first_best = values.index(max(values))
    assert best == {
        "metric": "val/avsbench-binary/miou",
        "value": pytest.approx(max(values)),
        "step": epochs[first_best]["step"],
        "epoch": epochs[first_best]["epoch"],
    }
    for weights, expected in (("best", max(values)), ("last", values[-1])):
        result = CliRunner().invoke(_cli(), ["evaluate", "--run", str(run), "--split", "val", "--weights", weights, "--json"])
        assert result.exit_code == 0, result.output
        scored = json.loads(result.output.strip().splitlines()[-1])
        assert scored["miou"] == pytest.approx(expected) and scored["weights"].endswith(os.path.join("model", weights))
    default = CliRunner().invoke(_cli(), ["evaluate", "--run", str(run), "--split", "val", "--json"])
    assert json.loads(default.output.strip().splitlines()[-1])["weights"].endswith(os.path.join("model", "best"))


def test_a_run_from_before_model_last_is_read_as_last(whole_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(whole_run[0], old, ignore=shutil.ignore_patterns("best"))
    for name in os.listdir(old / "model" / "last"):
        os.replace(old / "model" / "last" / name, old / "model" / name)
    os.rmdir(old / "model" / "last")
    result = CliRunner().invoke(_cli(), ["evaluate", "--run", str(old), "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.strip().splitlines()[-1])
    assert scored["weights"] == str(old / "model") and scored["miou"] == pytest.approx(whole_run[1]["eval"]["real"]["miou"])
    best = CliRunner().invoke(_cli(), ["evaluate", "--run", str(old), "--weights", "best"])
    assert best.exit_code == 1 and "no best model yet" in best.output


def test_resumed_after_sigterm_and_kill_9_equals_uninterrupted(whole_run, vggish_cache):
    import threading

    from soundstage.train.loop import Stopped, train

    whole, broken = whole_run[0], vggish_cache["root"] / "broken"

    def send_sigterm_after_step_2():
        while _steps_done(broken) < 2:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm_after_step_2, daemon=True)
    sender.start()
    with pytest.raises(Stopped):
        train(config(vggish_cache, broken, **RUN), log=lambda *_: None, progress=False)
    sender.join()
    stopped_at = _steps_done(broken)
    assert 2 <= stopped_at < 9

    process = subprocess.Popen(_command(vggish_cache, broken), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _steps_done(broken) < stopped_at + 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    train(config(vggish_cache, broken, **RUN), log=lambda *_: None, progress=False)
    assert_same_run(whole, broken)


def _records(run, name):
    lines = (run / "metrics" / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("step_seconds", "clips_per_s")} for line in lines]


def assert_same_run(whole, other):
    """Bit-identical weights, and the same step and epoch records (timings aside)."""
    a = load_file(str(whole / "model" / "last" / "model.safetensors"))
    b = load_file(str(other / "model" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(whole / "model" / "last" / "avs_conditioning.pt", weights_only=True)
    cb = torch.load(other / "model" / "last" / "avs_conditioning.pt", weights_only=True)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert _records(whole, "steps.jsonl") == _records(other, "steps.jsonl")
    assert _records(whole, "epochs.jsonl") == _records(other, "epochs.jsonl")
    # TensorBoard: what was written after the checkpoint a resume started from was purged: every step once
    resumed, uninterrupted = tensorboard_scalars(other), tensorboard_scalars(whole)
    assert resumed.keys() == uninterrupted.keys()
    for tag in ("train/loss", "train/loss_dice", "train/lr", "val/avsbench-binary/miou", "val/segpref/real-swapped/fscore"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in uninterrupted[tag]], tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in uninterrupted[tag]]), tag


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_a_running_training_refuses_a_second_one_and_stops_whole_on_sigterm_to_its_group(vggish_cache, tmp_path):
    """A second ``train`` into a run folder that is being trained is refused, naming the first.
    Then what SLURM does at a time limit: SIGTERM to every process. The DataLoader workers leave
    it to the loop, which checkpoints and exits 75; no process is left."""
    from test_shutdown import descendants, wait_gone

    out = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen([*_command(vggish_cache, out), "--workers", "2"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while _steps_done(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    below = descendants(proc.pid)
    assert len(below) >= 2, below  # the loader's workers
    second = CliRunner().invoke(_cli(), _command(vggish_cache, out)[3:])
    assert second.exit_code == 1 and f"Error: {out} is being trained by pid {proc.pid} on " in second.output, second.output
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    finally:
        left = wait_gone(below, timeout=10)
    assert code == 75, (tmp_path / "log.txt").read_text()
    assert "stopped by SIGTERM" in (tmp_path / "log.txt").read_text() and left == set()


def _stop_after_step(run, cfg, steps: int) -> int:
    """Train ``cfg`` until SIGTERM after ``steps`` steps (as a scheduler would); the step it stopped at."""
    import threading

    from soundstage.train.loop import Stopped, train

    def send_sigterm():
        while _steps_done(run) < steps:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm, daemon=True)
    sender.start()
    with pytest.raises(Stopped):
        train(cfg, log=lambda *_: None, progress=False)
    sender.join()
    return _steps_done(run)


def _zero_256_bytes_in_the_middle(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        assert f.read(256) != bytes(256)  # the damage changes something
        f.seek(size // 2)
        f.write(bytes(256))


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_ends_as_an_uninterrupted_one(whole_run, vggish_cache):
    import shutil

    from soundstage.train.checkpoint import CheckpointError
    from soundstage.train.loop import train

    whole, damaged = whole_run[0], vggish_cache["root"] / "damaged"
    stopped_at = _stop_after_step(damaged, config(vggish_cache, damaged, **RUN), 4)
    checkpoints = damaged / "checkpoints"
    assert torch.load(checkpoints / "previous.pt", weights_only=True)["step"] == stopped_at - 1  # the last two are kept
    _zero_256_bytes_in_the_middle(checkpoints / "latest.pt")

    hopeless = vggish_cache["root"] / "hopeless"  # the same run with both checkpoints damaged
    shutil.copytree(damaged, hopeless)
    _zero_256_bytes_in_the_middle(hopeless / "checkpoints" / "previous.pt")
    steps_before = (hopeless / "metrics" / "steps.jsonl").read_text()
    with pytest.raises(CheckpointError, match="no good checkpoint to resume from.*latest.pt: .*previous.pt: "):
        train(config(vggish_cache, hopeless, **RUN), log=lambda *_: None, progress=False)
    assert (hopeless / "metrics" / "steps.jsonl").read_text() == steps_before  # never a silent restart
    assert sorted(os.listdir(hopeless / "checkpoints")) == ["latest.pt", "previous.pt"]  # a rerun says the same

    lines = []
    train(config(vggish_cache, damaged, **RUN), log=lines.append, progress=False)
    set_aside = [line for line in lines if "set aside" in line]
    assert len(set_aside) == 1 and "latest.pt: its content does not match the checksum" in set_aside[0], lines
    assert f"at step {stopped_at - 1} " in next(line for line in lines if line.startswith("resuming"))
    assert (checkpoints / "latest.pt.damaged").exists()
    assert_same_run(whole, damaged)


class _FakeReader(dict):
    """A cue output in memory: clip id -> {field: array}."""

    meta = {"stage": "active-queries", "fingerprint": "test"}


def test_active_query_lists_become_multi_hot_weights(vggish_cache):
    from soundstage.train.cues import active_cue
    from soundstage.train.data import CueError

    rows = read_manifest(vggish_cache["manifest"])
    val = rows[rows["split"] == "val"]
    spec = active_cue("active-queries")
    assert spec.lengths_field == "frame_lengths"
    lists = {cid: [[t % 4, 5], [], *[[7]] * (int(n) - 2)] for t, (cid, n) in enumerate(zip(val["clip_id"], val["num_frames"]))}
    reader = _FakeReader(
        {
            cid: {
                "query_ids": np.array([q for ids in frames for q in ids], np.int32),
                "frame_lengths": np.array([len(ids) for ids in frames], np.int32),
            }
            for cid, frames in lists.items()
        }
    )
    data = AVSClips(vggish_cache["manifest"], "val", {"active": (spec, reader)}, 64, num_queries=8)
    for index, cid in enumerate(data.clip_ids):
        expected = np.zeros((len(lists[cid]), 8), np.float32)
        for frame, ids in enumerate(lists[cid]):
            expected[frame, ids] = 1
        assert np.array_equal(data[index]["active"].numpy(), expected)
    too_few = AVSClips(vggish_cache["manifest"], "val", {"active": (spec, reader)}, 64, num_queries=6)
    with pytest.raises(CueError, match="outside the model's 6 queries"):
        too_few[0]


def test_a_run_directory_refuses_other_settings(whole_run, vggish_cache):
    from soundstage.train.config import ConfigError
    from soundstage.train.loop import train

    with pytest.raises(ConfigError, match="lr"):
        train(config(vggish_cache, whole_run[0], **{**RUN, "lr": 5e-3}), log=lambda *_: None, progress=False)
    result = CliRunner().invoke(_cli(), _command(vggish_cache, whole_run[0])[3:] + ["--lr", "0.005"])
    assert result.exit_code == 1 and "other settings" in result.output


def _train_on(vggish_cache, tmp_path, rows):
    manifest = os.path.join(os.path.dirname(vggish_cache["manifest"]), f"{tmp_path.name}.csv")  # beside it: same relative paths
    write_manifest(rows, manifest)
    command = _command(vggish_cache, tmp_path / "run")[3:]
    command[command.index("--manifest") + 1] = manifest
    try:
        result = CliRunner().invoke(_cli(), command)
    finally:
        os.remove(manifest)  # the dataset is the session's, shared: leave it as it was
    assert result.exit_code == 1 and "bug" not in result.output, result.output
    return manifest, result.output


def test_an_empty_train_split_is_one_line(vggish_cache, tmp_path):
    rows = read_manifest(vggish_cache["manifest"])
    manifest, output = _train_on(vggish_cache, tmp_path, rows[rows["split"] != "train"])
    assert f"Error: {manifest}: no clips to train on in split 'train' (the manifest has: " in output


def test_a_clip_id_in_two_rows_is_refused_not_trained_on_twice(vggish_cache, tmp_path):
    import pandas as pd

    rows = read_manifest(vggish_cache["manifest"])
    twice = rows[rows["split"] == "train"].iloc[0]
    manifest, output = _train_on(vggish_cache, tmp_path, pd.concat([rows, rows[rows["clip_id"] == twice["clip_id"]]]))
    position = list(rows["clip_id"]).index(twice["clip_id"]) + 2
    assert f"Error: manifest {manifest}: clip_id {twice['clip_id']} is in rows {position}, {len(rows) + 2}; " in output


# ------------------------------------------------------------------------------------ runs side by side


def test_runs_table_compares_status_best_sensitivity_and_differing_settings(whole_run, tmp_path):
    import shutil

    run, _ = whole_run
    root = tmp_path / "runs"
    shutil.copytree(run, root / "a-finished")
    running, stopped = root / "b-running", root / "c-stopped"
    for copy, lr in ((running, 5e-3), (stopped, 1e-3)):
        shutil.copytree(run, copy)
        (copy / "DONE").unlink()
        settings = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**settings, "lr": lr}))
    import socket

    (running / "train.lock").write_text(f"pid {os.getpid()} on {socket.gethostname()} since 2026-01-01 00:00:00")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stopped / "train.lock").write_text(f"pid {dead.pid} on {socket.gethostname()} since 2026-01-01 00:00:00")
    shutil.rmtree(stopped / "model" / "best")  # best from the evaluations instead

    epochs = [json.loads(line) for line in (run / "metrics" / "epochs.jsonl").read_text().splitlines()]
    best = max(epochs, key=lambda e: e["eval"]["real"]["miou"])
    real = best["eval"]["real"]["protocols"]["avsbench-binary"]["miou"]
    muted, swapped = (best["eval"][v]["protocols"]["avsbench-binary"]["miou"] for v in ("muted", "swapped"))

    result = CliRunner().invoke(_cli(), ["runs", str(root), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in map(json.loads, result.output.splitlines())}
    assert {name: r["status"] for name, r in rows.items()} == {
        "a-finished": "finished",
        "b-running": "running",
        "c-stopped": "stopped",
    }
    for r in rows.values():
        assert r["steps"] == 9 and r["evals"] == 3 and r["metric"] == "val/avsbench-binary/miou"
        assert r["best"] == pytest.approx(real) and r["best_epoch"] == best["epoch"]
        assert r["real-muted"] == pytest.approx(real - muted) and r["real-swapped"] == pytest.approx(real - swapped)
    assert [r["settings"] for r in rows.values()] == [{"lr": 1e-3}, {"lr": 5e-3}, {"lr": 1e-3}]

    table = CliRunner().invoke(_cli(), ["runs", str(root)]).output.splitlines()
    assert table[0].split() == ["run", "status", "steps", "evals", "best", "val/avsbench-binary/miou", "real-muted", "real-swapped", "lr"]  # fmt: skip
    assert table[3].split()[:5] == ["b-running", "running", "9", "3", f"{real:.4f}"]
    assert table[3].split()[-3:] == [f"{real - muted:.4f}", f"{real - swapped:.4f}", "0.005"]
    empty = CliRunner().invoke(_cli(), ["runs", str(tmp_path / "a-finished-nothing")])
    assert empty.exit_code == 1 and "no such folder" in empty.output


# ------------------------------------------------------------------------------------ frictions


def test_cached_clips_batch_5_and_10_frame_clips(vggish_cache):
    from soundstage.cache.dataset import CachedClips

    ds = CachedClips(vggish_cache["manifest"], {"vggish": vggish_cache["stage_dir"]})
    for loader in (ds.loader(batch_size=12), torch.utils.data.DataLoader(ds, batch_size=12, collate_fn=ds.collate_fn)):
        (batch,) = list(loader)
        assert batch["clip_id"] == [r["clip_id"] for r in ds.rows] and len(batch["row"]) == 12
        embeddings = batch["vggish"]["embeddings"]
        assert isinstance(embeddings, list) and {len(e) for e in embeddings} == {5, 10}
        for cid, e in zip(batch["clip_id"], embeddings):
            np.testing.assert_array_equal(e.numpy(), raw_field(vggish_cache["stage_dir"], cid, "embeddings"))
    fives = CachedClips(vggish_cache["manifest"], {"vggish": vggish_cache["stage_dir"]}, subset="v1s")
    (same_length,) = list(fives.loader(batch_size=12))
    assert same_length["vggish"]["embeddings"].shape[:2] == (len(fives), 5)  # one shape: stacked


def test_train_help_shows_the_defaults_and_none_is_accepted_for_every_cue(vggish_cache, tmp_path):
    import click

    from soundstage.train.cli import train

    assert CliRunner().invoke(_cli(), ["train", "--help"]).exit_code == 0
    with click.Context(train) as ctx:
        shown = {p.name: p.get_help_record(ctx)[1] for p in train.params if isinstance(p, click.Option)}
    for option, default in (("epochs", "10"), ("lr", "0.0001"), ("batch_size", "2"), ("accumulate", "1"), ("audio", "vggish")):
        assert f"[default: {default}]" in shown[option], option
    cfg = resolve_config(
        None, {"manifest": vggish_cache["manifest"], "cache": vggish_cache["cache"], "active": "none", "prior": "none"}
    )
    assert cfg.active is None and cfg.prior is None
    result = CliRunner().invoke(_cli(), _command(vggish_cache, tmp_path / "r")[3:] + ["--active", "none", "--max-steps", "1", "--epochs", "1", "--probes", "", "--tracker", "none"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "r" / "tb").exists() and (tmp_path / "r" / "model" / "last").is_dir()


def _progress_log(steps: int, seconds: str, monkeypatch) -> str:
    """What a progress bar of ``steps`` steps writes to a file (not a terminal)."""
    import io

    from soundstage.pipeline.progress import progress_bar

    monkeypatch.setenv("SOUNDSTAGE_PROGRESS_SECONDS", seconds)
    log = io.StringIO()
    bar = progress_bar(steps, "train", True, unit="step", stream=log)
    for _ in range(steps):
        bar.update(1)
    bar.close()
    return log.getvalue()


def test_progress_without_a_terminal_is_one_line_per_interval(monkeypatch):
    text = _progress_log(50, "0", monkeypatch)
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 2 <= len(lines) <= 52 and lines[-1].startswith("train: 100%") and "50/50" in lines[-1]
    assert len(_progress_log(1000, "3600", monkeypatch).splitlines()) <= 2  # the first line and the last only


def test_a_moved_run_folder_evaluates_and_resumes_but_not_on_other_data(vggish_cache, tmp_path):
    """A project moved with its runs (`mv project moved`): the run finds its cache and manifest at
    the same places relative to it, evaluates as before, and is taken as the same run by `train`;
    a manifest of other content is refused."""
    import shutil

    from soundstage.train.loop import train

    project = tmp_path / "project"
    shutil.copytree(vggish_cache["root"] / "cache", project / "cache")
    shutil.copy(vggish_cache["manifest"], project / "manifest.csv")
    for name in os.listdir(os.path.dirname(vggish_cache["manifest"])):  # the clips the manifest names
        if os.path.isdir(os.path.join(os.path.dirname(vggish_cache["manifest"]), name)):
            os.symlink(os.path.join(os.path.dirname(vggish_cache["manifest"]), name), project / name)
    settings = {**FAST, "epochs": 1, "probes": [], "manifest": str(project / "manifest.csv"), "cache": str(project / "cache")}
    record = train(resolve_config(None, {**settings, "out": str(project / "runs" / "a")}), log=lambda *_: None, progress=False)
    moved = tmp_path / "moved"
    os.rename(project, moved)

    scored = CliRunner().invoke(_cli(), ["evaluate", "--run", str(moved / "runs" / "a"), "--split", "val", "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output.strip().splitlines()[-1])["miou"] == pytest.approx(record["eval"]["real"]["miou"])
    lines = []
    again = {**settings, "manifest": str(moved / "manifest.csv"), "cache": str(moved / "cache"), "out": str(moved / "runs" / "a")}
    train(resolve_config(None, again), log=lines.append, progress=False)
    assert any("the run is complete" in line for line in lines), lines

    rows = read_manifest(str(moved / "manifest.csv"))
    write_manifest(rows.iloc[::-1], str(moved / "reordered.csv"))  # other bytes: another manifest
    from soundstage.train.config import ConfigError

    with pytest.raises(ConfigError, match="cannot resume on other data: the manifest .*reordered.csv differs"):
        train(resolve_config(None, {**again, "manifest": str(moved / "reordered.csv")}), log=lambda *_: None, progress=False)


def test_evaluating_during_training_changes_nothing_it_trains(vggish_cache, tmp_path):
    """The muted probe builds the audio model (its layers draw initial weights) and evaluation may
    draw random numbers: none of it reaches the training's random stream."""
    from soundstage.train.loop import train

    weights = {}
    for every in (1, 3):
        cfg = config(vggish_cache, tmp_path / f"every{every}", epochs=3, eval_every=every, probes=["muted", "noise:10"])
        train(cfg, log=lambda *_: None, progress=False)
        last = tmp_path / f"every{every}" / "model" / "last"
        weights[every] = {
            **load_file(str(last / "model.safetensors")),
            **torch.load(last / "avs_conditioning.pt", weights_only=True),
        }
    assert weights[1].keys() == weights[3].keys()
    for name, value in weights[1].items():
        assert torch.equal(value, weights[3][name]), name
