"""``soundstage manifest``: build a checked manifest from AVSBench, or generate the synthetic set."""

from __future__ import annotations

import os
import time

import click

from soundstage.manifests.avsbench import SPLITS, SUBSETS, MetadataError, build_avsbench_manifest, summarize
from soundstage.manifests.synth import make_synthetic_dataset
from soundstage.manifests.table import read_manifest, relative_paths, write_manifest


@click.group()
def manifest():
    """Build and check manifests (one row per clip)."""


@manifest.command()
@click.argument("root", type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--output",
    default="manifests/avsbench.csv",
    show_default=True,
    help="Manifest to write: .csv, or .parquet (needs pyarrow).",
)
@click.option(
    "--subset", "subsets", multiple=True, type=click.Choice(SUBSETS), help="Keep only these subsets (repeatable); default all."
)
@click.option(
    "--split", "splits", multiple=True, type=click.Choice(SPLITS), help="Keep only these splits (repeatable); default all."
)
@click.option("--strict", is_flag=True, help="Exit with status 1 when any clip has a problem.")
@click.option("--workers", default=16, show_default=True, type=click.IntRange(min=1), help="Threads opening files.")
@click.option("--relative", is_flag=True, help="Write paths relative to the manifest's folder (default absolute).")
@click.option("--decode", is_flag=True, help="Decode every image fully instead of checking headers (slower).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar while checking.")
def avsbench(root, output, subsets, splits, strict, workers, relative, decode, progress):
    """Read an AVSBench release at ROOT and write one checked row per clip.

    ROOT holds either the unified release (metadata.csv, label2idx.json, v1s/ v1m/ v2/) or the
    older AVSBench-object layout (s4_meta_data.csv / ms3_meta_data.csv, also inside
    Single-source/ and Multi-sources/). Every referenced file is opened; clips with missing or
    unreadable files keep their row, with the cause in the problem column.
    """
    started = time.perf_counter()
    try:
        result = build_avsbench_manifest(root, subsets or None, splits or None, workers=workers, decode=decode, progress=progress)
    except MetadataError as e:
        raise click.ClickException(str(e)) from None
    table = result.manifest
    if relative:
        table = relative_paths(table, os.path.dirname(os.path.abspath(output)))
    try:
        write_manifest(table, output)
    except ImportError:  # pandas needs pyarrow (or fastparquet) for .parquet
        raise click.ClickException(
            f"{output}: cannot write Parquet without pyarrow; pip install pyarrow, or write .csv"
        ) from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{result.layout} AVSBench layout at {os.path.abspath(root)}: {len(table)} clips checked "
        f"in {time.perf_counter() - started:.1f} s -> {output}"
    )
    click.echo(summarize(result.manifest))
    problems = int((result.manifest["problem"] != "").sum())
    if strict and problems:
        click.echo(f"--strict: {problems} clips have problems", err=True)
        raise SystemExit(1)


@manifest.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--clips", default=100, show_default=True, type=click.IntRange(min=1), help="How many clips.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
def synth(out, clips, seed):
    """Generate a synthetic AVSBench-layout dataset in OUT and write OUT/manifest.csv.

    OUT must be empty, new, or an earlier synthetic dataset (which is replaced).
    """
    started = time.perf_counter()
    try:
        path = make_synthetic_dataset(out, clips=clips, seed=seed)
    except FileExistsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"synthetic AVSBench dataset ({clips} clips, seed {seed}) in {time.perf_counter() - started:.1f} s -> {path}")
    click.echo(summarize(read_manifest(path)))
