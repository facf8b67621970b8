"""caption -> sources -> textcues on the synthetic dataset, with tiny models built from configs.

Every stored value is checked against an independent computation: captions and LLM answers
against one-item-at-a-time generation with the same saved model (so batching and left
padding change nothing), cue vectors against encoding each name alone, masks against the
source lists.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from _text_models import build_blip, build_chat_lm, build_clip, build_roberta
from click.testing import CliRunner
from PIL import Image

from soundstage.cache import open_stage
from soundstage.llm.parse import parse_answer
from soundstage.llm.prompt import load_template
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import read_manifest, write_manifest
from soundstage.pipeline.runner import run_stage
from soundstage.pipeline.stage import ClipError
from soundstage.stages import caption, sources, textcues

QUIET = dict(workers=0, progress=False, log=lambda *a: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_models")
    return {
        "blip": build_blip(root / "blip"),
        "lm": build_chat_lm(root / "lm"),
        "roberta": build_roberta(root / "roberta"),
        "clip": build_clip(root / "clip"),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 synthetic clips (5, 5 and 10 frames) and a cache where the caption stage has run."""
    root = tmp_path_factory.mktemp("text_ds")
    manifest = make_synthetic_dataset(str(root / "avsbench"), clips=3, seed=1, workers=1)
    return {"manifest": manifest, "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def captions(models, dataset):
    params = {"model": models["blip"], "num_beams": 2, "max_new_tokens": 8, "device": "cpu", "frames_per_call": 7}
    summary = run_stage(caption.STAGE, dataset["manifest"], dataset["cache"], params, batch_size=2, **QUIET)
    assert summary.ok and summary.done == 3
    return summary, open_stage(summary.path)


def test_captions_equal_one_image_at_a_time(models, dataset, captions):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out = captions
    processor = AutoProcessor.from_pretrained(models["blip"])
    model = AutoModelForImageTextToText.from_pretrained(models["blip"]).eval()
    manifest = read_manifest(dataset["manifest"])
    root = os.path.dirname(dataset["manifest"])
    seen = set()
    for row in manifest.to_dict("records"):
        stored = out[row["clip_id"]]["captions"]
        assert len(stored) == int(row["num_frames"])
        for i, text in enumerate(stored):
            image = Image.open(os.path.join(root, row["frames_dir"], f"{i}.jpg")).convert("RGB")
            ids = model.generate(**processor(images=image, return_tensors="pt"), num_beams=2, max_new_tokens=8)
            assert text == " ".join(processor.decode(ids[0], skip_special_tokens=True).split())
            seen.add(text)
    assert len(seen) > 1  # the tiny captioner does look at the images


def test_caption_prompt_is_stripped_and_fingerprinted(models, dataset, captions, tmp_path):
    summary, plain = captions
    params = {"model": models["blip"], "num_beams": 2, "max_new_tokens": 8, "device": "cpu", "prompt": "a picture of"}
    cache = str(tmp_path / "cache")
    prompted = run_stage(caption.STAGE, dataset["manifest"], cache, params, **QUIET)
    assert prompted.ok and prompted.fingerprint != summary.fingerprint
    text = open_stage(prompted.path)[next(iter(plain))]["captions"][0]
    assert not text.startswith("a picture of")
    assert caption.strip_prompt("A  picture of a dog", "a picture of") == "a dog"


def test_missing_and_corrupt_frames_fail_their_clip_only(models, dataset, tmp_path):
    manifest = read_manifest(dataset["manifest"])
    root = os.path.dirname(dataset["manifest"])
    rows = []
    for k, fault in enumerate(["missing", "corrupt"]):
        row = dict(manifest.iloc[k])
        frames = tmp_path / f"frames_{fault}"
        shutil.copytree(os.path.join(root, row["frames_dir"]), frames)
        if fault == "missing":
            os.remove(frames / "3.jpg")
        else:
            data = (frames / "2.jpg").read_bytes()
            (frames / "2.jpg").write_bytes(data[: len(data) // 3])
        row.update(clip_id=f"broken_{fault}", frames_dir=str(frames))
        rows.append(row)
    good = dict(manifest.iloc[0])
    good["frames_dir"] = os.path.join(root, good["frames_dir"])
    broken_manifest = str(tmp_path / "manifest.csv")
    write_manifest(type(manifest)([good] + rows), broken_manifest)
    params = {"model": models["blip"], "num_beams": 1, "max_new_tokens": 4, "device": "cpu"}
    summary = run_stage(caption.STAGE, broken_manifest, str(tmp_path / "cache"), params, batch_size=3, **QUIET)
    failed = dict(summary.failed)
    assert set(failed) == {"broken_missing", "broken_corrupt"} and summary.done == 1
    assert "3.jpg" in failed["broken_missing"] and "missing" in failed["broken_missing"]
    assert "2.jpg" in failed["broken_corrupt"] and "unreadable" in failed["broken_corrupt"]
    with pytest.raises(ClipError, match="3.jpg"):
        caption.load(rows[0], type("Ctx", (), {"manifest_dir": root})())


def test_sources_with_tiny_lm_garbage_is_unparseable_not_a_crash(models, dataset, captions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = {"llm": models["lm"], "dtype": "fp32", "device": "cpu", "max_new_tokens": 10, "llm_batch_size": 4}
    summary = run_stage(sources.STAGE, dataset["manifest"], dataset["cache"], params, batch_size=2, **QUIET)
    assert summary.ok and summary.done == 3
    out = open_stage(summary.path)
    _, caption_out = captions

    # independent: each prompt alone, no padding, straight through generate
    tokenizer = AutoTokenizer.from_pretrained(models["lm"])
    model = AutoModelForCausalLM.from_pretrained(models["lm"]).eval()
    template = load_template()

    def alone(captions_):
        text = tokenizer.apply_chat_template(template.messages(captions_), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        new = model.generate(**ids, do_sample=False, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(new[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    statuses = []
    for cid in out:
        rec, frames = out[cid], caption_out[cid]["captions"]
        assert len(rec["response"]) == len(frames)
        for i in (0, len(frames) - 1):
            assert rec["response"][i] == alone([frames[i]])
        assert rec["clip_response"] == alone(frames)
        for response, status, names in zip(rec["response"], rec["status"], rec["sources"]):
            parsed = parse_answer(response)
            assert status == parsed.status and json.loads(names) == parsed.names
            statuses.append(status)
        assert list(rec["attempts"]) == [1] * len(frames)
    assert "unparseable" in statuses and set(statuses) <= {"ok", "unparseable"}

    # the chain goes on: text cues of unparseable frames are masked zeros
    cues = run_stage(
        textcues.STAGE, dataset["manifest"], dataset["cache"], {"encoder": models["roberta"], "device": "cpu"}, **QUIET
    )
    assert cues.ok and cues.done == 3
    cue_out = open_stage(cues.path)
    for cid in cue_out:
        arrays, mask = cue_out[cid]["cues"], cue_out[cid]["cue_mask"]
        expected = [
            [j < len(json.loads(n) or []) for j in range(4)] if s == "ok" else [False] * 4
            for s, n in zip(out[cid]["status"], out[cid]["sources"])
        ]
        assert mask.tolist() == expected
        assert not arrays[~mask].any()


# --- textcues against a stand-in sources output with known answers ------------------------

KNOWN = {  # clip -> per frame (status, sources)
    "c1": [
        ("ok", ["guitar", "man"]),
        ("ok", []),
        ("unparseable", None),
        ("error", None),
        ("ok", ["guitar", "man", "dog", "piano", "violin"]),
    ],
    "c2": [("ok", ["electric guitar"]), ("ok", ["drum", "guitar"])],
}


def _stand_in_sources():
    def make(frames):
        return {
            "status": [s for s, _ in frames],
            "sources": [json.dumps(n) for _, n in frames],
            "vocab_sources": [json.dumps(n) for _, n in frames],
        }

    def process(model, items, params):
        out = []
        for frames in items:
            rec = {f.name: ([""] * len(frames) if f.shape else "") for f in sources.STAGE.fields if f.dtype == "str"}
            rec.update({f.name: ([1] * len(frames) if f.shape else 1) for f in sources.STAGE.fields if f.dtype != "str"})
            rec.update(make(frames))
            out.append(rec)
        return out

    return dataclasses.replace(sources.STAGE, setup=None, load=lambda row, ctx: KNOWN[row["clip_id"]], process=process)


def _known_cache(tmp_path, models):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("clip_id,vid\n" + "".join(f"{c},shared_vid\n" for c in KNOWN))
    cache = str(tmp_path / "cache")
    # stand-in upstreams: captions are not read by the stand-in sources, only needed to exist
    run_stage(
        dataclasses.replace(
            caption.STAGE,
            setup=None,
            load=lambda row, ctx: None,
            required_columns=(),
            process=lambda m, items, p: [{"captions": ["x"]} for _ in items],
        ),
        str(manifest),
        cache,
        {"model": models["blip"]},
        **QUIET,
    )
    run_stage(_stand_in_sources(), str(manifest), cache, {"llm": models["lm"]}, **QUIET)
    return str(manifest), cache


def _alone(model_dir, name, pooling):
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    ids = tokenizer(name, return_tensors="pt")
    with torch.no_grad():
        hidden = getattr(model, "text_model", model)(input_ids=ids["input_ids"]).last_hidden_state[0]
        if pooling == "mean":  # over the name's tokens
            return hidden.mean(0).numpy()
        # CLIP: the state at the last token (end of text), projected into the joint space or not
        return (model.text_projection(hidden[-1]) if pooling == "projected" else hidden[-1]).numpy()


@pytest.mark.parametrize("encoder,pooling", [("roberta", "mean"), ("clip", "pooler"), ("clip", "projected")])
def test_textcues_slots_masks_and_vectors(models, tmp_path, encoder, pooling):
    manifest, cache = _known_cache(tmp_path, models)
    params = {"encoder": models[encoder], "pooling": pooling, "n_slots": 3, "device": "cpu"}
    summary = run_stage(textcues.STAGE, manifest, cache, params, batch_size=2, **QUIET)
    assert summary.ok and summary.done == 2
    out = open_stage(summary.path)
    for cid, frames in KNOWN.items():
        cues, mask = out[cid]["cues"], out[cid]["cue_mask"]
        names = np.array(out[cid]["cue_names"]).reshape(len(frames), 3)
        assert cues.dtype == np.float16 and cues.shape[:2] == (len(frames), 3)
        for i, (status, frame_sources) in enumerate(frames):
            kept = (frame_sources or [])[:3] if status == "ok" else []
            assert mask[i].tolist() == [j < len(kept) for j in range(3)]
            assert names[i].tolist() == kept + [""] * (3 - len(kept))
            for j, name in enumerate(kept):
                np.testing.assert_allclose(cues[i, j], _alone(models[encoder], name, pooling), rtol=2e-3, atol=2e-3)
            assert not cues[i, len(kept) :].any()  # masked slots: exact zeros


def test_textcues_projected_needs_a_dual_encoder(models):
    with pytest.raises(ValueError, match="no projected text features"):
        textcues.TextEncoder(
            {"encoder": models["roberta"], "pooling": "projected", "dtype": "fp32", "device": "cpu", "encoder_batch_size": 8}
        )


def test_textcues_vocab_names_and_cli(models, tmp_path):
    manifest, cache = _known_cache(tmp_path, models)
    result = CliRunner().invoke(
        __import__("soundstage.cli", fromlist=["main"]).main,
        [
            "textcues",
            "--manifest",
            manifest,
            "--cache",
            cache,
            "--encoder",
            models["roberta"],
            "--names",
            "vocab",
            "--n-slots",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    out = open_stage(os.path.join(cache, "textcues", os.listdir(os.path.join(cache, "textcues"))[0]))
    assert np.array(out["c1"]["cue_names"]).reshape(-1, 2)[4].tolist() == ["guitar", "man"]


def test_frame_names_from_vocabulary_mapping():
    record = {
        "status": ["ok", "ok", "unparseable"],
        "sources": ['["electric guitar", "guitars", "tree"]', "[]", "null"],
        "vocab_sources": ['["guitar", "guitar", null]', "[]", "null"],
    }
    assert textcues.frame_names(record, "raw") == [["electric guitar", "guitars", "tree"], [], []]
    assert textcues.frame_names(record, "vocab") == [["guitar"], [], []]
    with pytest.raises(ClipError, match="vocabulary"):
        textcues.frame_names({"status": ["ok"], "sources": ["[]"], "vocab_sources": ["null"]}, "vocab")


def test_segpref_json_says_which_clips_share_a_key():
    from soundstage.stages.export import segpref_texts, shared_keys_note

    def record(names):
        return {"status": ["ok"], "sources": [json.dumps(names)], "vocab_sources": [json.dumps(names)]}

    reader = {"a": record(["dog"]), "b": record(["dog"]), "c": record(["cat"]), "d": record(["dog"])}
    rows = [{"clip_id": "a", "vid": "v"}, {"clip_id": "b", "vid": "v"}, {"clip_id": "c", "vid": "w"}]
    rows.append({"clip_id": "d", "vid": "v"})
    texts, report = segpref_texts(rows, reader, 4, "raw", "vid")
    assert texts == {"v": {"f0": "dog,None,None,None,"}, "w": {"f0": "cat,None,None,None,"}}
    assert report["clips"] == 4 and report["sharing"] == {"v": ["a", "b", "d"]} and not report["conflicts"]
    note = shared_keys_note(report["sharing"], "vid")
    assert note.startswith("3 clips share 1 vid(s)") and "v: 3 clips, kept a (same as b, d)" in note
    reader["d"] = record(["bird"])  # different cues under one key: a conflict, never folded
    _, report = segpref_texts(rows, reader, 4, "raw", "vid")
    assert report["conflicts"] == [("v", "a", "d")] and report["sharing"] == {"v": ["a", "b"]}


def test_export_segpref_json(models, tmp_path):
    from soundstage.cli import main

    manifest, cache = _known_cache(tmp_path, models)
    out = str(tmp_path / "segpref" / "text.json")
    args = ["export", "segpref-json", "--manifest", manifest, "--cache", cache, "--out", out]
    # SegPref looks texts up by vid; the two clips share one with different texts: refuse
    shared = CliRunner().invoke(main, args)
    assert shared.exit_code != 0 and "shared_vid" in shared.output and not os.path.exists(out)
    result = CliRunner().invoke(main, args + ["--key", "clip_id"])
    assert result.exit_code == 0, result.output
    assert "2 without a usable answer" in result.output  # unparseable + error; [] is an answer
    texts = json.loads(open(out).read())
    assert texts["c1"] == {
        "f0": "guitar,man,None,None,",
        "f1": "None,None,None,None,",
        "f2": "None,None,None,None,",
        "f3": "None,None,None,None,",
        "f4": "guitar,man,dog,piano,",
    }
    assert texts["c2"] == {"f0": "electric guitar,None,None,None,", "f1": "drum,guitar,None,None,"}
    # read back as SegPref's loader does: append None, split at commas, first 4 slots
    for cid, frames in KNOWN.items():
        for i, (status, names) in enumerate(frames):
            slots = (texts[cid][f"f{i}"] + "None").split(",")[:4]
            kept = (names or [])[:4] if status == "ok" else []
            assert slots == kept + ["None"] * (4 - len(kept))
    unpadded = CliRunner().invoke(main, args + ["--key", "clip_id", "--n-slots", "0"])
    assert unpadded.exit_code == 0 and json.loads(open(out).read())["c1"]["f0"] == "guitar,man,"


# --- ImageBind text features as SegPref computes them --------------------------------------


@pytest.fixture(scope="module")
def imagebind(tmp_path_factory):
    from soundstage.models.imagebind import BPE_FILE
    from soundstage.models.tiny import build_imagebind_text

    folder = tmp_path_factory.mktemp("imagebind")
    return build_imagebind_text(folder / "imagebind_text.pth"), str(folder / BPE_FILE)


def test_textcues_imagebind_segpref_slots_and_segpref_text_export(models, imagebind, tmp_path):
    from soundstage.cli import main
    from soundstage.models.imagebind import ImageBindText

    manifest, cache = _known_cache(tmp_path, models)
    checkpoint, bpe = imagebind
    params = {"encoder": checkpoint, "bpe_vocab": bpe, "slots": "segpref", "device": "cpu"}
    summary = run_stage(textcues.STAGE, manifest, cache, params, batch_size=2, **QUIET)
    assert summary.ok and summary.done == 2, summary.format()
    out = open_stage(summary.path)
    model = ImageBindText.from_checkpoint(checkpoint, bpe)
    out_dir = tmp_path / "text_feat"
    (tmp_path / "pipeline.yaml").write_text(f"manifest: {manifest}\ncache: {cache}\n")
    result = CliRunner().invoke(
        main, ["export", "segpref-text", "--config", str(tmp_path / "pipeline.yaml"), "--out", str(out_dir)]
    )
    assert result.exit_code == 0, result.output
    for cid, frames in KNOWN.items():
        cues, mask = out[cid]["cues"], out[cid]["cue_mask"]
        names = np.array(out[cid]["cue_names"]).reshape(len(frames), 4)
        assert cues.shape == (len(frames), 4, 1024) and mask.all()  # SegPref attends to every slot
        assert sorted(os.listdir(out_dir / cid)) == [f"{i}.np" for i in range(len(frames))]
        for i, (status, frame_sources) in enumerate(frames):
            kept = (frame_sources or [])[:4] if status == "ok" else []
            texts = kept + ["None"] * (4 - len(kept))  # "None" is embedded, not zeroed
            assert names[i].tolist() == texts
            np.testing.assert_allclose(cues[i], model(texts).numpy(), rtol=2e-3, atol=2e-3)  # float16 cache
            exported = np.load(out_dir / cid / f"{i}.np")  # as SegPref reads {feat_text_dir}/{uid}/{idx}.np
            assert exported.dtype == np.float32 and exported.shape == (4, 1024)
            np.testing.assert_array_equal(exported, cues[i].astype(np.float32))
    # a masked-slot output is refused: SegPref would read zeros where it trained on "None"
    masked = run_stage(textcues.STAGE, manifest, cache, dict(params, slots="masked"), **QUIET)
    result = CliRunner().invoke(
        main,
        ["export", "segpref-text", "--manifest", manifest, "--cache", cache, "--out", str(tmp_path / "m")]
        + ["--textcues", os.path.basename(masked.path)],
    )
    assert result.exit_code != 0 and "--slots segpref" in result.output


def test_export_segpref_json_takes_config(models, tmp_path):
    from soundstage.cli import main

    manifest, cache = _known_cache(tmp_path, models)
    (tmp_path / "pipeline.yaml").write_text(f"manifest: {manifest}\ncache: {cache}\n")
    out = tmp_path / "text.json"
    args = ["export", "segpref-json", "--config", str(tmp_path / "pipeline.yaml"), "--key", "clip_id", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["c2"] == {"f0": "electric guitar,None,None,None,", "f1": "drum,guitar,None,None,"}
