"""Choosing which cached output of an upstream stage a stage reads.

A selector is a fingerprint (or a unique prefix of one), ``key=value,...`` of the upstream's
parameters, or a dict of parameters. With no selector: exactly one output of the upstream stage
in the cache is used (and the choice is printed); several stop the run with a list to choose from.
A pipeline file knows every stage's parameters, so it selects by the exact expected fingerprint.
"""

from __future__ import annotations

import json

from soundstage.cache.index import has_results
from soundstage.cache.store import StageDir, iter_stage_dirs
from soundstage.pipeline.fingerprint import normalise_params, stage_meta
from soundstage.pipeline.registry import get_stage
from soundstage.pipeline.stage import Stage


class UpstreamError(RuntimeError):
    pass


def parse_selector(text: str | dict | None):
    """``None`` | fingerprint prefix (str) | dict of parameter values."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if "=" not in text:
        return text
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise UpstreamError(f"bad upstream selector {text!r}: use key=value,key=value or a fingerprint")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _param_matches(stage: Stage, meta: dict, name: str, wanted) -> bool:
    param = stage.param(name)
    stored_display = meta.get("params", {}).get(name)
    stored_key = meta.get("fingerprint_payload", {}).get("params", {}).get(name)
    value = normalise_params(stage, {name: wanted})[name]
    if value == stored_display:
        return True
    if param.identity is not None:
        try:
            return param.identity(value) == stored_key
        except Exception:
            return False
    return json.dumps(value) == json.dumps(stored_display)


def describe(sd: StageDir) -> str:
    meta = sd.meta()
    params = ", ".join(f"{k}={v}" for k, v in meta.get("params", {}).items())
    return f"{meta['fingerprint']}  {params}"


def choose(cache_root: str, stage: Stage, selector=None, log=print) -> StageDir:
    """The one output of ``stage`` under ``cache_root`` that ``selector`` picks."""
    selector = parse_selector(selector)
    # an output with nothing committed (a failed first attempt) is never a candidate
    outputs = [sd for sd in iter_stage_dirs(cache_root, stage.name) if has_results(sd)]
    if isinstance(selector, str):
        found = [sd for sd in outputs if sd.meta()["fingerprint"].startswith(selector)]
    elif isinstance(selector, dict):
        for key in selector:
            stage.param(key)  # unknown parameter names are an error, not "no match"
        found = [sd for sd in outputs if all(_param_matches(stage, sd.meta(), k, v) for k, v in selector.items())]
    else:
        found = outputs
    if len(found) == 1:
        if selector is None:
            log(f"using the only {stage.name} output in {cache_root}: {describe(found[0])}")
        return found[0]
    wanted = f" matching {selector}" if selector else ""
    if not found:
        listing = "".join(f"\n  {describe(sd)}" for sd in outputs) or " (none)"
        raise UpstreamError(
            f"no {stage.name} output{wanted} in {cache_root}; run `soundstage {stage.name}` first. Present:{listing}"
        )
    listing = "".join(f"\n  {describe(sd)}" for sd in found)
    raise UpstreamError(
        f"{len(found)} {stage.name} outputs{wanted} in {cache_root}; choose one with "
        f"--{stage.name} FINGERPRINT or --{stage.name} key=value,...:{listing}"
    )


def resolve_upstreams(stage: Stage, cache_root: str, select: dict | None = None, log=print) -> dict[str, StageDir]:
    """alias -> chosen StageDir for each upstream of ``stage``; ``select`` is keyed by stage name."""
    select = select or {}
    return {up.alias: choose(cache_root, get_stage(up.stage), select.get(up.stage), log) for up in stage.upstream}


def expected_meta(stage_name: str, params_by_stage: dict[str, dict]) -> dict:
    """The stage.json ``stage_name`` has under a pipeline's parameters (recursing upstream)."""
    stage = get_stage(stage_name)
    ups = {up.alias: (up.stage, expected_fingerprint(up.stage, params_by_stage)) for up in stage.upstream}
    return stage_meta(stage, params_by_stage.get(stage_name, {}), ups)


def expected_fingerprint(stage_name: str, params_by_stage: dict[str, dict]) -> str:
    """The fingerprint ``stage_name`` has under a pipeline's parameters (recursing upstream)."""
    return expected_meta(stage_name, params_by_stage)["fingerprint"]
