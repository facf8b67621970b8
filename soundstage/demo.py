"""``soundstage demo``: the whole pipeline on this machine, with no dataset and no network.

Into ``--out`` (default ``./demo``) it writes

- ``data/``: the synthetic AVSBench-layout dataset (``soundstage.manifests.synth``);
- ``models/``: tiny models with seeded random weights (``soundstage.models.tiny``), saved the way
  the real ones are distributed and loaded by the stages through the same code;
- ``pipeline.yaml``: every stage with these models — a template to edit for real data and real
  models (each model line names the real default in a comment);
- ``cache/``: the stage outputs, produced by the pipeline runner (``soundstage run``).

Each step is skipped when its result is already there, and the runner skips cached outputs, so
a second ``soundstage demo`` computes nothing. The numbers are meaningless: the models are
random stand-ins; the demo shows the pipeline working end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import click
from transformers.utils import logging as hf_logging

from soundstage.cache.index import output_status
from soundstage.cache.store import StageDir
from soundstage.manifests.synth import MARKER, make_synthetic_dataset
from soundstage.manifests.table import read_manifest
from soundstage.models.tiny import TINY_CONFIG_DIR, TINY_MODELS, build_tiny_models, tiny_model_path
from soundstage.pipeline.executors import run_pipeline
from soundstage.pipeline.pipeline_file import load_pipeline
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import expected_fingerprint
from soundstage.pipeline.runner import run_stage
from soundstage.stages.export import query_mapping
from soundstage.train.command import audio_table
from soundstage.train.compare import write_comparison
from soundstage.train.config import ConfigError, resolve_config
from soundstage.train.cues import CueError
from soundstage.train.loop import train
from soundstage.train.recipes import recipes
from soundstage.train.report import write_report
from soundstage.train.run_dir import RunDir
from soundstage.train.run_eval import evaluate_saved_run

DEFAULT_CLIPS = 160  # 94 train clips: with fewer the tiny model learns less of which object sounds (docs/training.md)

#: stage -> [(parameter, demo value, comment)]. A value "model:NAME" is the tiny model NAME of
#: ``soundstage.models.tiny.TINY_MODELS`` (its comment names the real model it stands in for).
DEMO_STAGES = {
    "audio-stats": [("silence_db", -60, "")],
    "hubert": [
        ("model", "model:hubert", "or a fairseq HuBERT .pt"),
        ("layer", 2, "the tiny model has 2 layers; real: 9 for fairseq's hubert_base_ls960_L9_km500 units"),
    ],
    "kmeans": [
        ("k", 16, "real: 100 or 500"),
        ("percent", 1.0, "real: 0.1 (fit on 10% of the clips)"),
        ("seed", 0, ""),
    ],
    "units": [("top_k", 3, "")],
    "beats": [("checkpoint", "model:beats", "official fine-tuned checkpoint, downloaded from microsoft/unilm")],
    "vggish": [
        ("checkpoint", "model:vggish", "download from github.com/harritaylor/torchvggish/releases"),
        ("pad", "repeat-last", "rows = video frames; AVSBench repeats the last example"),
        ("variant", "towhee", "towhee's VGGish (signed), what the seed methods' loaders computed"),
    ],
    "caption": [
        ("model", "model:blip", ""),
        ("num_beams", 1, "real: 3"),
        ("max_new_tokens", 8, "real: 40"),
    ],
    "sources": [
        ("llm", "model:chat_lm", "or llm_endpoint: http://HOST:8000 of a vLLM server"),
        ("max_new_tokens", 16, "real: 512 (the LLM reasons before answering)"),
        ("dtype", "fp32", "real: bf16 on a GPU"),
        ("vocabulary", "data/label2idx.json", "map the names onto the dataset's classes"),
    ],
    "textcues": [
        ("encoder", "model:imagebind_text", "SegPref's text features"),
        ("bpe_vocab", "models/imagebind_text/bpe_simple_vocab_16e6.txt.gz", "real: CLIP's, shipped in imagebind/bpe/"),
        ("slots", "segpref", "SegPref's 4 slots, 'None' embedded in empty ones"),
    ],
    "frames": [("size", 64, "the tiny model's input; real: 384 (Mask2Former swin-base); training reads these")],
}

#: the pipeline file's ``train:`` section: [(setting, demo value, comment)]
DEMO_TRAIN = [
    ("audio", "vggish", "the cue: vggish | beats | beats-probs | units | STAGE:FIELD"),
    ("conditioning", "add", "add (AVSBench, bias_in_AVS) | cosine (Stepping Stones) | none"),
    ("task", "binary", "binary (S4/MS3) | semantic (AVSS, 71 classes)"),
    ("epochs", 44, "real: 50-150"),
    ("batch_size", 1, "clips per step (all their frames); 1: the tiny model needs ~4000 steps to listen"),
    ("lr", 0.003, "real: 1e-4 from the pretrained model"),
    ("warmup_steps", 5, ""),
    ("clip_grad", 10.0, "gradient norm limit; the default 1.0 slows the tiny model (its norms are 5-30)"),
    ("eval_every", 44, "epochs between evaluations (real, muted, zeroed, swapped, noise:10); here: the last only"),
    ("threads", 1, "a tiny model trains fastest on one thread of a busy CPU"),
]
DEMO_RUN = "demo"  # OUT/runs/<name>
RECIPE_STEPS = 4  # --recipes: optimizer steps of each recipe (a demo of the plumbing, not of the methods)
STAGE1_RECIPE, STAGE2_RECIPE = "stepping-stones-stage1", "stepping-stones-stage2"  # stage 2 reads stage 1's masks

STAND_IN_WARNING = """\
==============================================================================
  soundstage demo — TINY RANDOM STAND-IN MODELS: every number is MEANINGLESS.
  The whole pipeline runs on a small synthetic AVSBench-layout dataset with tiny
  models built from configs shipped in the package (random weights, seeded), to
  show it working end to end with no dataset and no network.
=============================================================================="""

TINY_OUTPUTS_NOTE = """\
With the stand-ins the captions are random words of a tiny vocabulary, the LLM's answers are
word salad (stored with status 'unparseable', so every text-cue slot holds SegPref's "None") and
the BEATs tags and HuBERT units are noise: the outputs have the right form, not the right content."""


def _model_value(value: str) -> str | None:
    return value[len("model:") :] if isinstance(value, str) and value.startswith("model:") else None


# ----------------------------------------------------------------------------- the inputs


def prepare_dataset(data_dir: str, clips: int, seed: int, out=click.echo) -> str:
    """The synthetic dataset's manifest; generated unless one with these settings is there."""
    manifest = os.path.join(data_dir, "manifest.csv")  # written last: its presence means complete
    made = _read_json(os.path.join(data_dir, MARKER))
    if os.path.exists(manifest) and (made.get("clips"), made.get("seed")) == (clips, seed):
        out(f"dataset: {clips} synthetic clips already in {data_dir}")
        return manifest
    start = time.monotonic()
    manifest = make_synthetic_dataset(data_dir, clips=clips, seed=seed, workers=1)
    out(f"dataset: generated {clips} synthetic clips in {data_dir} ({time.monotonic() - start:.1f} s)")
    return manifest


MODELS_MARKER = "TINY_MODELS.json"


def tiny_configs_digest() -> str:
    """Hash of the shipped tiny configs: models built from other configs are rebuilt."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(TINY_CONFIG_DIR)):
        with open(os.path.join(TINY_CONFIG_DIR, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def prepare_models(models_dir: str, seed: int, out=click.echo) -> dict[str, str]:
    """``{name: path}`` of the tiny models; built unless the same ones are there already."""
    marker = os.path.join(models_dir, MODELS_MARKER)
    wanted = {"seed": seed, "configs": tiny_configs_digest(), "models": sorted(TINY_MODELS)}
    paths = {name: tiny_model_path(models_dir, name) for name in TINY_MODELS}
    if _read_json(marker) == wanted and all(os.path.exists(p) for p in paths.values()):
        out(f"models: tiny stand-ins already in {models_dir}")
        return paths
    start = time.monotonic()
    with _quiet_transformers():
        paths = build_tiny_models(models_dir, seed=seed)
    with open(marker, "w", encoding="utf-8") as f:  # written last: a half-built folder is rebuilt
        json.dump(wanted, f, indent=1)
    out(f"models: built {len(paths)} tiny stand-ins in {models_dir} ({time.monotonic() - start:.1f} s)")
    return paths


def pipeline_text(out_dir: str, models: dict[str, str], stages: list[str]) -> str:
    """The demo's pipeline file: relative paths, each model line commented with the real one."""
    lines = [
        "# soundstage demo pipeline: TINY RANDOM STAND-IN models on a synthetic dataset (meaningless numbers).",
        "# To use real data and real models, edit this file: point `manifest` at your manifest",
        "# (soundstage manifest avsbench /path/to/AVSBench -o OUT.csv) and each model line at the real model",
        "# named in its comment (a hub id downloads once and then works offline), then",
        "#   soundstage run pipeline.yaml                                  # on this machine",
        "#   soundstage run pipeline.yaml --executor slurm --shards 64 --wait   # on a SLURM cluster",
        "# Relative paths resolve against this file's folder.",
        "",
        "manifest: data/manifest.csv",
        "cache: cache",
        "# what each SLURM task asks for (--executor slurm): the tiny models need no GPU. Real models:",
        "# leave this out and each stage asks for its own defaults (e.g. hubert: 1 GPU, 8 CPUs, 32G).",
        'resources: {gpus: 0, cpus: 1, mem: 2G, time: "00:20:00"}',
        "",
        "stages:",
    ]
    for stage in stages:
        lines.append(f"  {stage}:")
        for param, value, comment in DEMO_STAGES[stage]:
            model = _model_value(value)
            if model:
                value = os.path.relpath(models[model], out_dir)
                comment = f"real: {TINY_MODELS[model][2]}" + (f" ({comment})" if comment else "")
            entry = f"    {param}: {json.dumps(value)}"
            lines.append(f"{entry:<43} # {comment}" if comment else entry)
    lines += [
        "",
        "# soundstage train --config pipeline.yaml --out runs/NAME  (options override these)",
        "train:",
        "  # model: facebook/mask2former-swin-base-ade-semantic   # real; default: the tiny stand-in config",
    ]
    for setting, value, comment in DEMO_TRAIN:
        entry = f"  {setting}: {json.dumps(value)}"
        lines.append(f"{entry:<43} # {comment}" if comment else entry)
    body = "\n".join(lines) + "\n"
    return f"{GENERATED_MARK}{_digest(body)}\n{body}"


#: first line of the pipeline file the demo writes; a file whose body no longer matches the
#: checksum there was edited by someone, and the demo leaves it alone
GENERATED_MARK = "# written by `soundstage demo`; checksum "


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_pipeline_file(path: str, text: str) -> None:
    """Write the demo's pipeline file, unless the one there was edited (then stop: never lose edits)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            first, _, body = f.read().partition("\n")
        if not (first.startswith(GENERATED_MARK) and first[len(GENERATED_MARK) :] == _digest(body)):
            raise click.ClickException(
                f"{path} was edited since the demo wrote it, and the demo leaves it alone. Run it with "
                f"`soundstage run {path}`, or move it away to run the demo again."
            )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def available_stages() -> list[str]:
    """The demo's stages, in pipeline order; each must import (a broken install is an error,
    not a smaller demo)."""
    for name in DEMO_STAGES:
        try:
            get_stage(name)
        except Exception as e:
            raise click.ClickException(f"stage {name} does not import ({type(e).__name__}: {e})") from None
    return list(DEMO_STAGES)


# ----------------------------------------------------------------------------- the report


def stage_table(pipe, clip_ids: list[str]) -> list[dict]:
    """Per stage of the pipeline: its output's fingerprint, and clips committed / failed / expected
    (a whole-dataset stage counts as one item: its result)."""
    rows, wanted = [], set(clip_ids)
    for name in pipe.order():
        sd = StageDir.at(pipe.cache, name, expected_fingerprint(name, pipe.stages))
        status = output_status(sd, clip_ids, whole_dataset=get_stage(name).kind == "global")
        row = {
            "stage": name,
            "fingerprint": os.path.basename(sd.path),
            "path": sd.path,
            "global": status.whole_dataset,
            "done": int(status.fitted) if status.whole_dataset else len(status.done),
            "failed": len(status.failed),
            "total": 1 if status.whole_dataset else len(wanted),
        }
        rows.append(row)
    return rows


def format_table(before: list[dict], after: list[dict]) -> str:
    lines = [f"{'stage':<12} {'fingerprint':<17} {'clips done':>10} {'failed':>7} {'new this run':>13}"]
    for old, row in zip(before, after):
        done = ("fitted" if row["done"] else "not fitted") if row["global"] else f"{row['done']}/{row['total']}"
        lines.append(f"{row['stage']:<12} {row['fingerprint']:<17} {done:>10} {row['failed']:>7} {row['done'] - old['done']:>13}")
    return "\n".join(lines)


def how_to_go_real(pipeline_path: str, stages: list[str]) -> str:
    lines = [
        f"To run on real data with real models, edit {pipeline_path}:",
        "  manifest:  your dataset's manifest  (soundstage manifest avsbench /path/to/AVSBench -o OUT.csv)",
    ]
    for stage in stages:
        for param, value, _ in DEMO_STAGES[stage]:
            model = _model_value(value)
            if model:
                lines.append(f"  {stage}.{param}:".ljust(24) + TINY_MODELS[model][2])
    lines.append(f"then: soundstage run {pipeline_path}   (on SLURM: --executor slurm --shards 64 --wait)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="folder for the dataset, models, pipeline file and cache",
)
@click.option("--clips", default=DEFAULT_CLIPS, show_default=True, type=click.IntRange(min=1), help="synthetic clips to generate")
@click.option("--seed", default=0, show_default=True, help="seed of the dataset and of the tiny models' weights")
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm"]),
    default="local",
    show_default=True,
    help="where the shards run (slurm: submit array jobs and wait for them)",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="shards of every per-clip stage (local: parallel processes)",
)
@click.option(
    "--train-epochs",
    type=click.IntRange(min=0),
    help="epochs of the demo training (default: the pipeline file's; 0: no training)",
)
@click.option(
    "--recipes",
    "train_recipes",
    is_flag=True,
    help="also train every seed method's recipe (tiny configs) into OUT/runs/<recipe> and compare them (slow: minutes each)",
)
@click.option(
    "--recipe-steps",
    type=click.IntRange(min=1),
    default=RECIPE_STEPS,
    show_default=True,
    help="--recipes: optimizer steps of each recipe's demo training",
)
def demo(out_dir, clips, seed, executor, shards, train_epochs, train_recipes, recipe_steps):
    """Run the whole pipeline on a synthetic dataset with TINY RANDOM STAND-IN models (no download).

    Writes OUT/data, OUT/models, OUT/pipeline.yaml and OUT/cache; a second run computes nothing.
    Edit OUT/pipeline.yaml to point the same pipeline at real data and real models."""
    start = time.monotonic()
    out_dir = os.path.abspath(out_dir)
    click.echo(STAND_IN_WARNING)
    stages = available_stages()
    try:
        manifest = prepare_dataset(os.path.join(out_dir, "data"), clips, seed)
    except (FileExistsError, NotADirectoryError) as e:  # --out names a folder the demo did not make
        raise click.ClickException(f"--out {out_dir}: {e}") from None
    models = prepare_models(os.path.join(out_dir, "models"), seed)
    pipeline_path = os.path.join(out_dir, "pipeline.yaml")
    write_pipeline_file(pipeline_path, pipeline_text(out_dir, models, stages))
    click.echo(f"pipeline: {pipeline_path} (stages: {', '.join(stages)})\n")

    pipe = load_pipeline(pipeline_path)
    clip_ids = read_manifest(manifest)["clip_id"].tolist()
    before = stage_table(pipe, clip_ids)
    with _quiet_transformers():
        try:
            code = run_pipeline(pipe, None, executor=executor, shards=shards, wait=True)
        except (RuntimeError, OSError, KeyError, ValueError) as e:  # as `soundstage run` reports them
            raise click.ClickException(str(e)) from None
    after = stage_table(pipe, clip_ids)

    click.echo("\n" + STAND_IN_WARNING)
    click.echo(format_table(before, after))
    failed = sum(row["failed"] for row in after)
    incomplete = [row["stage"] for row in after if row["done"] < row["total"]]
    if not incomplete and all(a["done"] == b["done"] for a, b in zip(after, before)):
        click.echo("nothing new computed: every stage output was already in the cache")
    click.echo(f"cache: {pipe.cache}   (each output in <stage>/<fingerprint>/)")
    if incomplete:
        click.echo(
            f"NOT FINISHED: {failed} clip(s) failed; stages not complete: {', '.join(incomplete)} "
            "(causes above and in each output's failures/)"
        )
    else:
        click.echo(
            f"  list it:    soundstage status --cache {pipe.cache}\n"
            f"  one clip:   soundstage tags show --cache {pipe.cache} -- {clip_ids[0]}\n"
            f"  in Python:  soundstage.cache.open_stage('{after[-1]['path']}')['{clip_ids[0]}']"
        )
        click.echo(TINY_OUTPUTS_NOTE)
    queries_ok = True
    if not incomplete:
        mapping = os.path.join(out_dir, "models", "query_mapping.json")
        queries_ok = active_queries(pipeline_path, pipe.cache, manifest, mapping)
    report = None
    if not incomplete and train_epochs != 0:
        run_dir = os.path.join(out_dir, "runs", DEMO_RUN)
        train_demo_model(pipeline_path, run_dir, manifest, train_epochs)
        report = masks_and_report(pipe.cache, manifest, run_dir, os.path.join(out_dir, "report"))
    recipes_page = None
    if not incomplete and train_recipes:
        trained = train_every_recipe(pipeline_path, os.path.join(out_dir, "runs"), manifest, recipe_steps)
        recipes_page = compare_recipes(trained, os.path.join(out_dir, "report-recipes"))
    click.echo("\n" + how_to_go_real(pipeline_path, stages))
    click.echo(f"\ndemo finished in {time.monotonic() - start:.1f} s")
    if report:
        click.echo(f"report: {report}   (open it in a browser)")
    if recipes_page:
        click.echo(f"recipes side by side: {recipes_page}   (open it in a browser)")
    click.get_current_context().exit(code or (1 if incomplete or not queries_ok else 0))


def train_demo_model(pipeline_path: str, run_dir: str, manifest: str, epochs: int | None) -> None:
    """Train the tiny model as the pipeline file's ``train:`` section says, and print how it
    scores with its real audio and with the audio replaced."""
    splits = set(read_manifest(manifest)["split"])
    if not {"train", "val"} <= splits:
        click.echo("\ntraining: skipped, the dataset needs train and val clips (--clips 9 or more)")
        return
    options = {"out": run_dir, **({"epochs": epochs} if epochs else {})}
    click.echo(
        f"\ntraining the tiny audio-conditioned Mask2Former into {run_dir} "
        f"(reproduce: soundstage train --config {pipeline_path} --out DIR)"
    )
    try:
        cfg = resolve_config(pipeline_path, options)
        with _quiet_transformers():
            record = train(cfg, log=click.echo, progress=True)
    except (ConfigError, CueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(audio_table(record))
    if "test" in splits:
        click.echo(audio_table(score_test_split(run_dir)))
    click.echo("real vs muted/zeroed/swapped/noise: how much the model listens (it must lose accuracy without audio)")


def score_test_split(run_dir: str) -> dict:
    """The run's model (its best when it keeps one) on the test split (clips training never chose
    by) with every audio variant, in the form of a training evaluation record (``audio_table``
    prints it, naming the weights and their epoch)."""
    results = {}
    with _quiet_transformers():
        for variant in ("real", "muted", "zeroed", "swapped", "noise:10"):
            results[variant] = evaluate_saved_run(run_dir, split="test", audio=variant, device="cpu", log=lambda *_: None)
    best = RunDir(run_dir).best()
    weights = f"best model, epoch {best['epoch']}" if best else "last model"
    return {"split": "test", "weights": weights, "eval": results}


def train_every_recipe(pipeline_path: str, runs_dir: str, manifest: str, steps: int, out=click.echo) -> dict:
    """``--recipes``: each seed method's recipe trained briefly on the demo's caches into
    ``runs_dir/<recipe>``, then one table of them side by side (the paper's protocol of each, with
    the audio probes). After Stepping Stones' stage 1, its masks of every clip (stage 2's prior).
    A recipe whose cues the cache lacks is skipped with the reason."""
    cache = load_pipeline(pipeline_path).cache
    records = {}  # recipe -> its last evaluation (and its run folder under "run")
    stage1_masks = None
    for name in recipes():
        if name == "generic":
            continue
        run_dir = os.path.join(runs_dir, name)
        out(
            f"\nrecipe {name}: {steps} steps into {run_dir} (soundstage train --config {pipeline_path} --recipe {name} --out DIR)"
        )
        settings = {"out": run_dir, "recipe": name, "epochs": 1, "max_steps": steps, "batch_size": 1}
        if name == STAGE2_RECIPE and stage1_masks:
            settings["prior"] = f"masks={stage1_masks}"
        try:
            cfg = resolve_config(pipeline_path, settings)
            with _quiet_transformers():
                records[name] = {**train(cfg, log=lambda *_: None, progress=False), "run": run_dir}
                if name == STAGE1_RECIPE:
                    masks = run_stage(get_stage("masks"), manifest, cache, {"run": run_dir}, progress=False, log=lambda *_: None)
                    stage1_masks = os.path.basename(masks.path)
                    out(f"its masks of every clip (stage 2's prior): {masks.format().splitlines()[0]}")
        except (ConfigError, CueError, FileNotFoundError, ValueError) as e:
            out(f"recipe {name}: skipped ({e})")
    if records:
        out("\n" + recipe_table(records))
    return records


def compare_recipes(records: dict, out_dir: str, out=click.echo) -> str | None:
    """The comparison page of the recipes' runs (``soundstage report --run A --run B ...``)."""
    runs = [r["run"] for r in records.values() if os.path.exists(os.path.join(r["run"], "DONE"))]
    if len(runs) < 2:
        return None
    with _quiet_transformers():
        page = write_comparison(runs, out_dir, log=lambda *_: None)
    out(f"  the same as a page: soundstage report {' '.join('--run ' + r for r in runs)} --out DIR")
    return page


def recipe_table(records: dict) -> str:
    """One line per recipe: its protocol's mIoU and F with the real audio and each probe."""
    variants = []
    for record in records.values():
        variants += [v for v in record.get("eval", {}) if v not in variants]
    header = f"{'recipe':24s} " + " ".join(f"{v:>17s}" for v in variants)
    lines = ["every seed method on one cache (mIoU / F by each paper's protocol; tiny stand-ins):", header, "-" * len(header)]
    for name, record in records.items():
        cells = []
        for v in variants:
            r = record.get("eval", {}).get(v, {})
            cells.append(f"{_score(r.get('miou'))} / {_score(r.get('fscore'))}".rjust(17))
        lines.append(f"{name:24s} " + " ".join(cells))
    return "\n".join(lines)


def _score(value) -> str:
    return "  —   " if value is None else f"{value:.4f}"


def masks_and_report(cache: str, manifest: str, run_dir: str, report_dir: str, out=click.echo) -> str | None:
    """After training: the run's stage-1 masks for every clip (the masks stage, as Stepping Stones'
    stage 2 would read them) and the run's report page, whose path is returned. The page is
    rewritten only when the run finished after it was written."""
    done = os.path.join(run_dir, "DONE")
    if not os.path.exists(done):
        out("report: skipped, the demo run did not finish")
        return None
    with _quiet_transformers():
        summary = run_stage(get_stage("masks"), manifest, cache, {"run": run_dir}, progress=False, log=lambda *_: None)
    out(
        f"\nstage-1 masks of every clip: {summary.format().splitlines()[0]}\n"
        f"  as PNGs: soundstage export masks --manifest {manifest} --cache {cache} --out DIR"
    )
    page = os.path.join(report_dir, "index.html")
    if os.path.exists(page) and os.path.getmtime(page) >= os.path.getmtime(done):
        return page

    split = "test" if "test" in set(read_manifest(manifest)["split"]) else None  # the clips training never chose by
    with _quiet_transformers():
        return write_report(run_dir, report_dir, split=split, cache=cache, log=lambda *_: None)


def active_queries(pipeline_path: str, cache: str, manifest: str, mapping_path: str, out=click.echo) -> bool:
    """bias_in_AVS's active queries from the demo's units and BEATs tags, through the documented
    default mapping (written once, beside the models: it keys the output, so it is never replaced)."""
    if not os.path.exists(mapping_path):
        click.get_current_context().invoke(query_mapping, config=pipeline_path, out_path=mapping_path)
    summary = run_stage(
        get_stage("active-queries"), manifest, cache, {"mapping": mapping_path}, progress=False, log=lambda *_: None
    )
    out(
        f"\nactive queries (bias_in_AVS) of every clip, through the default mapping {mapping_path}:\n"
        f"active-queries {os.path.basename(summary.path)}  {summary.done + summary.cached}/{summary.selected} clips, "
        f"{len(summary.failed)} failed\n"
        f"  as .pth files: soundstage export active-queries --manifest {manifest} --cache {cache} --out DIR"
    )
    return summary.ok


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class _quiet_transformers:
    """Silence transformers' progress bars and advice while building/running the tiny models."""

    def __enter__(self):
        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
