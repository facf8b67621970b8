"""The cache key of a stage output.

It covers stage name, version, normalised fingerprinted parameters (with model identities in
place of paths) and the upstream fingerprints; never the manifest, paths, batch size, device,
worker or shard counts.
"""

from __future__ import annotations

from soundstage.pipeline.identity import stable_hash
from soundstage.pipeline.stage import Stage


def normalise_params(stage: Stage, params: dict) -> dict:
    """Every declared parameter, defaults filled in, values coerced to the declared type."""
    unknown = set(params) - {p.name for p in stage.params}
    if unknown:
        raise ValueError(f"stage {stage.name} has no parameter(s) {', '.join(sorted(unknown))}")
    out = {}
    for p in stage.params:
        value = params.get(p.name, p.default)
        if value is not None and p.type in (int, float, bool, str) and not p.multiple:
            value = p.type(value)
        if p.multiple and value is not None:
            value = list(value)
        out[p.name] = value
    return out


def fingerprint_payload(stage: Stage, params: dict, upstream_fingerprints: dict) -> dict:
    """Everything the fingerprint is made of (stored verbatim in stage.json)."""
    params = normalise_params(stage, params)
    keyed = {}
    for p in stage.params:
        if not p.fingerprint:
            continue
        value = params[p.name]
        keyed[p.name] = p.identity(value) if p.identity is not None else value
    return {
        "stage": stage.name,
        "version": stage.version,
        "params": keyed,
        "upstream": dict(sorted(upstream_fingerprints.items())),
    }


def fingerprint(stage: Stage, params: dict, upstream_fingerprints: dict) -> str:
    return stable_hash(fingerprint_payload(stage, params, upstream_fingerprints))
