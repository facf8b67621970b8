"""The cache key of a stage output.

It covers stage name, version, normalised fingerprinted parameters (with model identities in
place of paths) and the upstream fingerprints; never the manifest, paths, batch size, device,
worker or shard counts.
"""

from __future__ import annotations

from soundstage import __version__
from soundstage.cache.schema import field_schema
from soundstage.pipeline.identity import canonical_json, stable_hash
from soundstage.pipeline.stage import Stage

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value, what: str) -> bool:
    """A bool, or its spelling in a selector or a file ("false" is False, not a non-empty string)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{what}: {value!r} is not a boolean (use true or false)")
    return bool(value)


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string"}


def coerce_value(kind: type, value, what: str):
    """``value`` as ``kind`` (int, float or str); a value that is not one is named in the error."""
    if kind is int and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{what}: {value!r} is not {_TYPE_NAMES[kind]}")
    if kind in (int, float) and isinstance(value, bool):  # yaml's `yes` is not a count
        raise ValueError(f"{what}: {value!r} is not {_TYPE_NAMES[kind]}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not {_TYPE_NAMES[kind]}") from None


def normalise_params(stage: Stage, params: dict) -> dict:
    """Every declared parameter, defaults filled in, values coerced to the declared type."""
    unknown = set(params) - {p.name for p in stage.params}
    if unknown:
        raise ValueError(f"stage {stage.name} has no parameter(s) {', '.join(sorted(unknown))}")
    out = {}
    for p in stage.params:
        value = params.get(p.name, p.default)
        if value is not None and p.type is bool and not p.multiple:
            value = parse_bool(value, f"stage {stage.name}: parameter {p.name}")
        elif value is not None and p.type in (int, float, str) and not p.multiple:
            value = coerce_value(p.type, value, f"stage {stage.name}: parameter {p.name}")
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
        if p.omit_default and value == p.default or p.applies and not p.applies(params):
            continue
        keyed[p.name] = p.identity(value) if p.identity is not None else value
    return {
        "stage": stage.name,
        "version": stage.version,
        "params": keyed,
        "upstream": dict(sorted(upstream_fingerprints.items())),
    }


def fingerprint(stage: Stage, params: dict, upstream_fingerprints: dict) -> str:
    return stable_hash(fingerprint_payload(stage, params, upstream_fingerprints))


def shown_params(stage: Stage, params: dict) -> dict:
    """The fingerprinted parameters as given (paths, not content hashes): stage.json's ``params``."""
    params = normalise_params(stage, params)
    return {p.name: params[p.name] for p in stage.params if p.fingerprint and (not p.applies or p.applies(params))}


def stage_meta(stage: Stage, params: dict, upstream: dict[str, tuple[str, str]]) -> dict:
    """What stage.json holds for ``stage`` under ``params``; ``upstream``: alias -> (stage, fingerprint).

    The fingerprint is computed here, once, when a run is planned (model identities hashed,
    hub revisions resolved); array tasks are handed it and check ``same_plan`` instead."""
    up_fps = {alias: fp for alias, (_, fp) in upstream.items()}
    payload = fingerprint_payload(stage, params, up_fps)
    return {
        "stage": stage.name,
        "version": stage.version,
        "kind": stage.kind,
        "fingerprint": stable_hash(payload),
        "fingerprint_payload": payload,
        "params": shown_params(stage, params),
        "upstream": {alias: {"stage": name, "fingerprint": fp} for alias, (name, fp) in upstream.items()},
        "fields": field_schema(stage.fields),
        "soundstage_version": __version__,
    }


def plan_mismatch(stage: Stage, params: dict, meta: dict) -> str | None:
    """Why ``params`` are not what the planned output (its stage.json ``meta``) was made with; None if they are."""
    if (meta.get("stage"), meta.get("version")) != (stage.name, stage.version):
        return f"it belongs to {meta.get('stage')} version {meta.get('version')}, not {stage.name} version {stage.version}"
    # a model named by path is keyed by its content (in the fingerprint handed over), not where
    # it lies: a copied or moved project names the same model by another path
    located = {p.name for p in stage.params if p.identity is not None}
    planned, shown = meta.get("params", {}), shown_params(stage, params)
    diff = {
        k: (planned.get(k), shown.get(k))
        for k in sorted((set(planned) | set(shown)) - located)
        if canonical_json(planned.get(k)) != canonical_json(shown.get(k))
    }
    if diff:
        return "planned with other parameters: " + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
    return None
