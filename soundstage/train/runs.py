"""``soundstage runs [DIR]``: the training runs under DIR side by side, one line each.

A run is a folder holding ``config.json`` and ``provenance.json`` (``soundstage.train.run_dir``),
at any depth (a run's own folders are not searched). Per run:

- status: ``finished`` (``DONE``), ``running`` (the process ``train.lock`` names — the one that
  last trained it — is alive: on this host its pid exists; on another host its metrics were
  written in the last ``STALE_SECONDS``), else ``stopped`` (rerun the same ``soundstage train``
  command to resume it);
- steps: the last optimizer step logged; evals: evaluations so far;
- best: the ``select`` metric of ``model/best`` (``best.json``), else the best evaluation so far;
- real−muted and real−swapped: the headline protocol's mIoU lost when the audio is muted or
  swapped, at that best evaluation;
- every setting whose value differs between the runs listed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import click

from soundstage.train.config import TrainConfig
from soundstage.train.evaluation import run_protocols, selected_metric
from soundstage.train.metric_names import metric_name, metric_values
from soundstage.train.run_dir import TRAINER_LOCK, RunDir

STALE_SECONDS = 900
NOT_COMPARED = {
    "out",
    "manifest",
    "cache",
    "pipeline",
    "workers",
    "device",
    "threads",
    "checkpoint_every",
    "log_every",
    "tracker",
}


def find_runs(root: str) -> list[RunDir]:
    found = []
    for folder, dirs, files in os.walk(root):
        if "config.json" in files and "provenance.json" in files:
            found.append(RunDir(folder))
            dirs[:] = []
        else:
            dirs.sort()
    return found


def status(run: RunDir) -> str:
    if run.done:
        return "finished"
    holder = trainer(run)
    if holder is None:
        return "stopped"
    pid, host = holder
    if host == socket.gethostname():
        return "running" if _alive(pid) else "stopped"
    lock, steps = run.file(TRAINER_LOCK), run.file("metrics", "steps.jsonl")
    written = max(os.path.getmtime(p) for p in (lock, steps) if os.path.exists(p))
    return "running" if time.time() - written < STALE_SECONDS else "stopped"


def trainer(run: RunDir) -> tuple[int, str] | None:
    """(pid, host) of the process that last trained the run, from ``train.lock`` (read, not
    locked: ``soundstage runs`` never keeps a trainer from starting)."""
    try:
        with open(run.file(TRAINER_LOCK), encoding="utf-8") as f:
            found = re.match(r"pid (\d+) on (\S+)", f.read(200))
    except OSError:
        return None
    return (int(found[1]), found[2]) if found else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def summary(run: RunDir, root: str) -> dict:
    """One run's line of the table, as numbers (None where the run has none yet)."""
    cfg = TrainConfig.from_dict(run.config())
    metric = selected_metric(cfg)
    steps, epochs = run.records("steps.jsonl"), run.records("epochs.jsonl")
    best = run.best()
    if best is not None and best.get("metric") == metric:
        at = next((r for r in epochs if r["step"] == best["step"]), None)
        value = best["value"]
    else:
        scored = [(metric_values(r).get(metric), r) for r in epochs]
        scored = [(v, r) for v, r in scored if v is not None]
        value, at = max(scored, key=lambda pair: pair[0]) if scored else (None, None)
    values = metric_values(at) if at else {}
    headline = run_protocols(cfg)[0]
    return {
        "run": os.path.relpath(run.path, root),
        "status": status(run),
        "steps": steps[-1]["step"] if steps else 0,
        "evals": len(epochs),
        "metric": metric,
        "best": value,
        "best_epoch": at["epoch"] if at else None,
        "real-muted": values.get(metric_name(cfg.eval_split, headline, "real-muted", "miou")),
        "real-swapped": values.get(metric_name(cfg.eval_split, headline, "real-swapped", "miou")),
        "settings": {**TrainConfig().to_dict(), **run.config()},
    }


def differing(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["settings"]} - NOT_COMPARED)
    return [k for k in keys if len({json.dumps(r["settings"].get(k), sort_keys=True) for r in rows}) > 1]


def table(rows: list[dict]) -> str:
    settings = differing(rows)
    metrics = {r["metric"] for r in rows}
    best_header = f"best {metrics.pop()}" if len(metrics) == 1 else "best (metric)"
    header = ["run", "status", "steps", "evals", best_header, "real-muted", "real-swapped", *settings]
    lines = [header]
    for r in rows:
        best = _number(r["best"])
        if r["best"] is not None and r["best_epoch"] is not None:
            best += f" @{r['best_epoch']}"
        if best_header == "best (metric)" and r["best"] is not None:
            best += f" ({r['metric']})"
        values = [_setting(r["settings"].get(k)) for k in settings]
        lines.append([r["run"], r["status"], str(r["steps"]), str(r["evals"]), best, _number(r["real-muted"]), _number(r["real-swapped"]), *values])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def _number(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def _setting(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return "none" if value is None else str(value)


@click.command("runs")
@click.argument("root", default="runs", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per run instead of the table")
def runs(root, as_json):
    """The training runs under ROOT (default runs/): status, steps, best metric, audio
    sensitivity (real − muted, real − swapped mIoU at the best evaluation) and the settings
    that differ between them."""
    if not os.path.isdir(root):
        raise click.ClickException(f"{root}: no such folder (give the folder holding the run directories)")
    rows = []
    for run in find_runs(root):
        try:
            rows.append(summary(run, root))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            click.echo(f"{run.path}: skipped, unreadable ({e})", err=True)
    if not rows:
        raise click.ClickException(f"{root}: no training runs under it (folders with config.json and provenance.json)")
    if as_json:
        keys = differing(rows)
        for r in rows:
            line = {k: v for k, v in r.items() if k != "settings"}
            click.echo(json.dumps({**line, "settings": {k: r["settings"].get(k) for k in keys}}))
        return
    click.echo(table(rows))
