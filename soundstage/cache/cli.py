"""``soundstage status``, ``soundstage verify`` and ``soundstage cache compact``."""

from __future__ import annotations

import json
import os
import uuid

import click

from soundstage.cache.maintenance import compact_stage, stage_status, verify_stage
from soundstage.cache.store import StageDir, iter_stage_dirs

CACHE_OPTION = click.option("--cache", "cache_root", type=click.Path(file_okay=False), envvar="SOUNDSTAGE_CACHE",
                            default="cache", show_default=True, help="cache root")
STAGE_OPTION = click.option("--stage", "stage_name", help="only this stage")


def _targets(cache_root: str, stage_name: str | None, dirs: tuple) -> list[StageDir]:
    if dirs:
        return [StageDir(d) for d in dirs]
    return list(iter_stage_dirs(cache_root, stage_name))


@click.command()
@CACHE_OPTION
@STAGE_OPTION
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(cache_root, stage_name, as_json):
    """Every stage output in the cache: parameters, clips done/failed, bytes."""
    rows = [stage_status(sd) for sd in iter_stage_dirs(cache_root, stage_name)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no stage outputs under {cache_root}")
        return
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        ups = ", ".join(f"{a}={u['stage']}/{u['fingerprint']}" for a, u in r["upstream"].items())
        click.echo(f"{r['stage']:<12} {r['fingerprint']}  done {r['done']:>7}  failed {r['failed']:>5}  "
                   f"{r['parts']:>4} parts  {r['bytes'] / 1e6:9.1f} MB")
        click.echo(f"    {params}" + (f"  <- {ups}" if ups else ""))
        click.echo(f"    {r['path']}")


@click.command()
@CACHE_OPTION
@STAGE_OPTION
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
def verify(cache_root, stage_name, dirs):
    """Check every committed part: opens, checksums, unique clip ids, consistent offsets."""
    targets = _targets(cache_root, stage_name, dirs)
    if not targets:
        raise click.ClickException(f"no stage outputs under {cache_root}")
    bad = 0
    for sd in targets:
        problems, notes, clips = verify_stage(sd)
        label = os.path.relpath(sd.path, cache_root) if not dirs else sd.path
        for note in notes:
            click.echo(f"  note {label}: {note}")
        if problems:
            bad += 1
            click.echo(f"FAIL {label}: {len(problems)} problem(s)")
            for p in problems:
                click.echo(f"  - {p}")
        else:
            click.echo(f"ok   {label}: {clips} clips")
    if bad:
        raise SystemExit(1)


@click.group()
def cache():
    """Cache maintenance."""


@cache.command()
@CACHE_OPTION
@STAGE_OPTION
@click.option("--target-mb", default=512, show_default=True, help="merge into parts of about this size")
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
def compact(cache_root, stage_name, target_mb, dirs):
    """Merge small parts into bigger ones, atomically (readers always see every clip)."""
    for sd in _targets(cache_root, stage_name, dirs):
        before, after = compact_stage(sd, target_bytes=target_mb * 1_000_000, writer_id=f"compact-{uuid.uuid4().hex[:8]}")
        click.echo(f"{sd.path}: {before} parts -> {after}")
