"""``soundstage tags``: AudioSet tags derived from the probabilities the beats stage stored.

Nothing here runs BEATs: thresholds and top-k are applied to the cached ``clip_probs`` and
``second_probs``, so trying another threshold costs a read. Class names go through the MIDs of
the checkpoint's ``label_dict`` (column i of the output is ``label_dict[i]``) and the AudioSet
class list shipped in ``soundstage/data/audioset`` — never by row order.
"""

from __future__ import annotations

import click
import numpy as np

from soundstage.cache import open_stage
from soundstage.cache.cli import CACHE_OPTION
from soundstage.manifests.table import read_manifest
from soundstage.models.audioset_tags import DEFAULT_THRESHOLD, TagNamer, class_mids_of_output, tag_counts
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.resolve import UpstreamError, choose


def _open_beats(cache: str, selector: str | None):
    try:
        sd = choose(cache, get_stage("beats"), selector, log=lambda msg: click.echo(msg, err=True))
    except UpstreamError as e:
        raise click.ClickException(str(e)) from None
    return sd, open_stage(sd.path)


def output_options(command):
    """The options every tags command shares: where the beats output is and the threshold."""
    options = [
        CACHE_OPTION,
        click.option("--beats", "selector", help="which beats output: fingerprint (prefix) or key=value,..."),
        click.option(
            "--checkpoint",
            type=click.Path(dir_okay=False),
            help="the output's checkpoint, if it moved (its label_dict names the classes)",
        ),
        click.option(
            "--threshold",
            type=float,
            default=DEFAULT_THRESHOLD,
            show_default=True,
            help="a class is a tag when its probability is at least this",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
def tags():
    """AudioSet tags from stored BEATs probabilities (nothing is recomputed)."""


@tags.command()
@click.argument("clip")
@output_options
@click.option(
    "--top-k",
    type=int,
    default=5,
    show_default=True,
    help="most probable classes of the whole clip, and most tags shown per second",
)
def show(clip, cache_root, selector, checkpoint, threshold, top_k):
    """The top classes of CLIP and its tags per second (= per video frame)."""
    sd, reader = _open_beats(cache_root, selector)
    if clip not in reader:
        raise click.ClickException(f"clip {clip!r} is not in {sd.path}")
    record = reader[clip]
    namer = TagNamer(class_mids_of_output(sd, checkpoint))
    click.echo(f"{clip}  (beats {sd.meta()['fingerprint']})")
    click.echo(f"top {top_k} over the clip:")
    for name, p in namer.top(np.asarray(record["clip_probs"]), top_k):
        click.echo(f"  {p:.3f}  {name}")
    click.echo(f"tags per second (p >= {threshold:g}, at most {top_k} shown):")
    for second, probs in enumerate(np.asarray(record["second_probs"])):
        names = namer.above(probs, threshold)
        more = f"  (+{len(names) - top_k} more)" if len(names) > top_k else ""
        click.echo(f"  {second:3d}  {'; '.join(names[:top_k]) or '-'}{more}")


@tags.command()
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False),
    envvar="SOUNDSTAGE_MANIFEST",
    help="count the clips of this manifest, per subset (default: every clip in the output)",
)
@output_options
@click.option("--top", type=int, default=10, show_default=True, help="classes listed per subset")
def summary(manifest, cache_root, selector, checkpoint, threshold, top):
    """Most frequent clip-level tags per subset, with counts: what the dataset sounds like."""
    sd, reader = _open_beats(cache_root, selector)
    namer = TagNamer(class_mids_of_output(sd, checkpoint))
    groups: dict[str, list[str]] = {}
    missing = 0
    if manifest:
        df = read_manifest(manifest)
        subsets = df["subset"] if "subset" in df.columns else ["all"] * len(df)
        for cid, subset in zip(df["clip_id"], subsets):
            if cid in reader:
                groups.setdefault(subset or "-", []).append(cid)
            else:
                missing += 1
    else:
        groups["all"] = sorted(reader)
    click.echo(f"beats {sd.meta()['fingerprint']}: clip tags with p >= {threshold:g}")
    for subset in sorted(groups):
        ids = groups[subset]
        counts, tagged = tag_counts(reader, ids, namer, threshold)
        click.echo(f"\n{subset}: {len(ids)} clips, {tagged} with at least one tag")
        for name, count in counts.most_common(top):
            click.echo(f"  {count:6d}  {100 * count / len(ids):5.1f}%  {name}")
    if missing:
        click.echo(f"\n{missing} clip(s) of the manifest have no beats output yet")
