"""active-queries: per video frame, the ids of the Mask2Former queries its audio activates (bias_in_AVS).

Built from cached outputs only (nothing runs a model): the units of that second (``units``:
the majority cluster, or its ``top_k`` most frequent clusters) and the AudioSet tags of that
second (``beats``: classes with ``second_probs >= --threshold``, 0.4 in the paper, most probable
first). Each cluster id and each AudioSet class goes to a query id in [0, Q) through an explicit
mapping file (``--mapping``), so a frame's list is: its cluster queries, then its tag queries,
duplicates dropped. Clusters and classes absent from the mapping activate nothing.

Mapping file (JSON; keys starting with ``_`` are comments)::

    {"queries": 100,
     "clusters": {"0": 0, "1": 1, ...},           # unit (k-means cluster) id -> query id
     "classes": {"/m/04rlf": 16, ...}}            # AudioSet MID -> query id

Its content (not its path), the threshold and the cluster rule are in the fingerprint, and the
mapping is kept in the output's stage.json (``metadata.mapping``); changing them recomputes only
this cheap stage. The upstream code that made bias_in_AVS's files was never released and how it
put clusters and classes into [0, 100) is undocumented: ``default_mapping`` (command ``soundstage
export query-mapping``) builds a documented one — clusters c -> c for c < K, then the Q - K most
frequent tags of the training split (frames with p >= threshold; ties by column) -> K, K + 1, ...

How the reference trainer consumes a clip's file (``soundstage export active-queries``): it
iterates the T frames, turns each list into a multi-hot vector over the 100 queries, clamps it to
[1e-6, 1 - 1e-6] and multiplies the audio embedding repeated over the queries by it; a list of
length 1 activates only query 0 there, whatever its id.

Fields: ``query_ids`` (all frames' ids, concatenated) and ``frame_lengths`` (ids per frame);
``frame_lists`` turns them back into T lists.
"""

import json
import os
from functools import lru_cache

import numpy as np

from soundstage.pipeline.identity import stable_hash
from soundstage.pipeline.stage import ClipError, Field, Param, Stage, Upstream

DEFAULT_QUERIES = 100
CLUSTER_RULES = ("majority", "top-k")


class MappingError(ValueError):
    pass


def parse_mapping(mapping: dict, where: str = "mapping") -> dict:
    """``{"queries": Q, "clusters": {int: q}, "classes": {mid: q}}`` checked: ids in [0, Q)."""
    try:
        queries = int(mapping["queries"])
        clusters = {int(k): int(v) for k, v in mapping.get("clusters", {}).items()}
        classes = {str(k): int(v) for k, v in mapping.get("classes", {}).items() if not str(k).startswith("_")}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MappingError(
            f'{where}: expected {{"queries": Q, "clusters": {{id: query}}, "classes": {{MID: query}}}} ({type(e).__name__}: {e})'
        ) from None
    bad = [f"{k}: {v}" for k, v in [*clusters.items(), *classes.items()] if not 0 <= v < queries]
    if bad:
        raise MappingError(f"{where}: query ids outside [0, {queries}): {', '.join(bad[:5])}")
    return {"queries": queries, "clusters": clusters, "classes": classes}


@lru_cache(maxsize=8)
def _read_mapping(path: str, mtime_ns: int) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_mapping(json.load(f), path)
    except (OSError, json.JSONDecodeError) as e:
        raise MappingError(f"mapping {path}: {e}") from None


def read_mapping(path: str) -> dict:
    if not path:
        raise MappingError("--mapping is required: a JSON file (build one with `soundstage export query-mapping`)")
    if not os.path.isfile(path):
        raise MappingError(f"mapping {path} does not exist")
    return _read_mapping(path, os.stat(path).st_mtime_ns)


def mapping_identity(path) -> str | None:
    """The mapping's content, not its path, keys the output."""
    if not path:
        return None
    m = read_mapping(path)
    return stable_hash({"queries": m["queries"], "clusters": m["clusters"], "classes": m["classes"]}, 32)


def mapping_json(mapping: dict) -> dict:
    """The JSON form of a parsed mapping (what ``--mapping`` files and mapping.json hold)."""
    return {
        "queries": mapping["queries"],
        "clusters": {str(k): v for k, v in sorted(mapping["clusters"].items())},
        "classes": dict(sorted(mapping["classes"].items(), key=lambda item: (item[1], item[0]))),
    }


def default_mapping(num_clusters: int, mids_by_frequency: list, queries: int = DEFAULT_QUERIES) -> dict:
    """Clusters c -> c (c < K), then the most frequent classes -> K, K + 1, ... up to Q - 1."""
    if num_clusters >= queries:
        raise MappingError(
            f"{num_clusters} clusters fill all {queries} queries and leave none for tags; "
            "use fewer clusters or write the mapping yourself"
        )
    classes = {mid: num_clusters + i for i, mid in enumerate(mids_by_frequency[: queries - num_clusters])}
    return {"queries": queries, "clusters": {c: c for c in range(num_clusters)}, "classes": classes}


def frame_queries(
    cluster_ids: np.ndarray, second_probs: np.ndarray, class_mids: list, mapping: dict, threshold: float
) -> list[list[int]]:
    """Per frame: mapped cluster ids (``cluster_ids [T, n]``, -1 = none), then mapped tags above
    the threshold, most probable first, without repeats."""
    lists = []
    for clusters, probs in zip(cluster_ids, second_probs.astype(np.float32)):
        ids = [mapping["clusters"][c] for c in clusters.tolist() if c in mapping["clusters"]]
        for col in np.argsort(-probs, kind="stable"):
            if probs[col] < threshold:
                break
            if class_mids[col] in mapping["classes"]:
                ids.append(mapping["classes"][class_mids[col]])
        lists.append(list(dict.fromkeys(ids)))
    return lists


def tag_ranking(second_probs, class_mids: list, threshold: float) -> list:
    """MIDs by how many frames (over all ``second_probs`` arrays) have them at or above the
    threshold, most frequent first, ties by column; classes never above it are left out."""
    counts = np.zeros(len(class_mids), np.int64)
    for probs in second_probs:
        counts += (np.asarray(probs, np.float32) >= threshold).sum(0)
    order = np.argsort(-counts, kind="stable")
    return [class_mids[i] for i in order if counts[i] > 0]


def frame_lists(record: dict) -> list[list[int]]:
    """A stored record back to T lists of query ids."""
    ends = np.cumsum(record["frame_lengths"])
    return [chunk.tolist() for chunk in np.split(np.asarray(record["query_ids"]), ends[:-1])]


def load(row, ctx):
    units = ctx.upstream["units"][row["clip_id"]]
    beats = ctx.upstream["beats"][row["clip_id"]]
    clusters = units["frame_majority"][:, None] if ctx.params["clusters"] == "majority" else units["frame_topk"]
    if len(clusters) != len(beats["second_probs"]):
        raise ClipError(f"units has {len(clusters)} frames but beats {len(beats['second_probs'])}")
    lists = frame_queries(
        clusters,
        beats["second_probs"],
        ctx.upstream["beats"].meta["metadata"]["class_mids"],
        read_mapping(ctx.params["mapping"]),
        ctx.params["threshold"],
    )
    return {
        "query_ids": np.array([q for ids in lists for q in ids], np.int32),
        "frame_lengths": np.array([len(ids) for ids in lists], np.int32),
    }


def setup(params):
    return read_mapping(params["mapping"])  # a bad mapping stops the run before any clip


def metadata(mapping, params) -> dict:
    return {"mapping": mapping_json(mapping)}


def process(mapping, items, params):
    return items  # computed in the workers


STAGE = Stage(
    name="active-queries",
    version=1,
    help="bias_in_AVS active queries per video frame from cached units and BEATs tags, through an explicit mapping.",
    upstream=[Upstream("units", "units"), Upstream("beats", "beats")],
    reads=(),  # no manifest column: only the upstream clips (their digests are part of this one's)
    params=[
        Param(
            "mapping",
            str,
            None,
            "JSON: cluster ids and AudioSet MIDs -> query ids (soundstage export query-mapping builds the default)",
            identity=mapping_identity,
        ),
        Param("threshold", float, 0.4, "a second's tag counts when its BEATs probability is at least this"),
        Param(
            "clusters", str, "majority", "the second's majority unit, or its top-k units (units --top-k)", choices=CLUSTER_RULES
        ),
    ],
    fields=[
        Field("query_ids", "int32", (None,), "every frame's query ids, concatenated (frame_lengths splits them)"),
        Field("frame_lengths", "int32", (None,), "[frames] how many query ids each video frame has"),
    ],
    load=load,
    setup=setup,
    metadata=metadata,
    process=process,
    default_batch_size=256,
)
