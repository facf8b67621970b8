"""``soundstage status``, ``soundstage verify`` and ``soundstage cache compact|rm|gc``."""

from __future__ import annotations

import json
import os
import uuid

import click

import soundstage.cache.gc as gc
import soundstage.cache.quarantine as quarantine
from soundstage.cache.maintenance import compact_stage, stage_status, verify_stage
from soundstage.cache.store import CacheError, StageDir, iter_stage_dirs

CACHE_OPTION = click.option(
    "--cache",
    "cache_root",
    type=click.Path(file_okay=False),
    envvar="SOUNDSTAGE_CACHE",
    default="cache",
    show_default=True,
    help="cache root",
)
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
        click.echo(
            f"{r['stage']:<12} {r['fingerprint']}  done {r['done']:>7}  failed {r['failed']:>5}  "
            f"{r['parts']:>4} parts  {r['bytes'] / 1e6:9.1f} MB"
        )
        click.echo(f"    {params}" + (f"  <- {ups}" if ups else ""))
        click.echo(f"    {r['path']}")
        for line in status_notes(r):
            click.echo(f"    {line}")


def status_notes(r: dict) -> list[str]:
    """What else a user should know about an output: broken parts, fit, clips without input digests."""
    lines = [f"BROKEN {b}" for b in r.get("broken", [])]
    if r.get("broken"):
        lines.append(f"repair: soundstage verify --repair {r['path']}")
    fit = r.get("fit")
    if fit:
        lines.append(f"fitted on {fit['fit_clips']} clips (fit key {fit['fit_key']})" if fit.get("fit_key") else fit["note"])
        if fit.get("pinned"):
            p = fit["pinned"]
            lines.append(f"pinned with --reuse-fit for a manifest of {p['clips']} clips ({p['time']})")
    if r.get("no_input_digest"):
        lines.append(
            f"{r['no_input_digest']} clip(s) without input digest (computed before soundstage recorded "
            "inputs): trusted as they are; --force recomputes them"
        )
    return lines


@click.command()
@CACHE_OPTION
@STAGE_OPTION
@click.option(
    "--repair",
    is_flag=True,
    help="move every bad part to quarantine/ in its output; the next run of the stage recomputes exactly their clips",
)
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
def verify(cache_root, stage_name, repair, dirs):
    """Check every committed part: opens, checksums, unique clip ids, consistent offsets.

    The verdict is recorded in each output: until a bad part is repaired, reading its clips
    fails and runs of the stage stop with its name."""
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
            click.echo(f"FAIL {label}: {len(problems)} problem(s)")
            for p in problems:
                click.echo(f"  - {p}")
            moved = quarantine.repair(sd) if repair else []
            for path in moved:
                click.echo(f"  quarantined -> {path}")
            if not moved:
                bad += 1
            elif verify_stage(sd)[0]:
                bad += 1
                click.echo(f"  {label}: problems remain after repair (see above)")
            else:
                click.echo(f"  {label}: repaired; rerun the stage to recompute the quarantined clips")
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
    busy = 0
    for sd in _targets(cache_root, stage_name, dirs):
        try:
            before, after = compact_stage(sd, target_bytes=target_mb * 1_000_000, writer_id=f"compact-{uuid.uuid4().hex[:8]}")
        except CacheError as e:  # a writer or another compaction holds it, or a damaged part
            busy += 1
            click.echo(f"skipped: {e}", err=True)
            continue
        click.echo(f"{sd.path}: {before} parts -> {after}")
    if busy:
        raise SystemExit(1)


@cache.command()
@CACHE_OPTION
@click.option("--dependents", "with_dependents", is_flag=True, help="also remove the outputs that read it")
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@click.argument("selector")
def rm(cache_root, with_dependents, dry_run, selector):
    """Remove one stage output: SELECTOR is its directory, STAGE/FINGERPRINT or a fingerprint (prefix).

    Outputs that read it are listed; they are removed too only with --dependents."""
    found = gc.find_outputs(cache_root, selector)
    if not found:
        raise click.ClickException(f"no stage output under {cache_root} matches {selector!r}")
    if len(found) > 1:
        listing = "".join(f"\n  {os.path.relpath(sd.path, cache_root)}" for sd in found)
        raise click.ClickException(f"{len(found)} outputs match {selector!r}; be more precise:{listing}")
    target = found[0]
    readers = gc.dependents(cache_root, target)
    for sd in readers:
        click.echo(f"depends on it: {os.path.relpath(sd.path, cache_root)}")
    if readers and not with_dependents:
        raise click.ClickException(
            f"{len(readers)} output(s) read {os.path.relpath(target.path, cache_root)} (listed "
            "above); pass --dependents to remove them too"
        )
    for sd in [*reversed(readers), target]:
        _remove(sd, cache_root, dry_run)


@cache.command("gc")
@CACHE_OPTION
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
def gc_command(cache_root, dry_run):
    """Remove outputs with nothing committed (failed first attempts), outputs whose upstream is gone
    and what interrupted removals left."""
    found, left = gc.garbage(cache_root), gc.leftovers(cache_root)
    if not found and not left:
        click.echo(f"nothing to remove under {cache_root}")
    for path in left:
        label = os.path.relpath(path, cache_root)
        click.echo(f"an interrupted removal: {label}")
        if dry_run:
            click.echo(f"would remove {label}")
        else:
            gc.remove_leftover(path)
            click.echo(f"removed {label}")
    busy = 0
    for sd, why in found:
        click.echo(f"{why}: {os.path.relpath(sd.path, cache_root)}")
        busy += not _remove(sd, cache_root, dry_run)
    if busy:
        raise SystemExit(1)


def _remove(sd: StageDir, cache_root: str, dry_run: bool) -> bool:
    label = os.path.relpath(sd.path, cache_root)
    if dry_run:
        click.echo(f"would remove {label}")
        return True
    try:
        gc.remove_output(sd)
    except CacheError as e:
        click.echo(f"skipped: {e}", err=True)
        return False
    click.echo(f"removed {label}")
    return True
