"""The command line of one array task: the stage command with exactly the settings planned."""

from __future__ import annotations

import os

from soundstage.cache.digest import input_digest_mode
from soundstage.pipeline.stage import Stage


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def stage_cli_args(
    stage: Stage, params: dict, manifest: str, cache: str, upstream_select: dict, values: dict, fingerprint: str | None = None
) -> list[str]:
    """The command-line arguments that rerun this stage with these exact settings (for array
    tasks); with ``fingerprint`` the task writes to that planned output, checking it."""
    args = ["--manifest", os.path.abspath(manifest), "--cache", os.path.abspath(cache)]
    if fingerprint:
        args += ["--fingerprint", fingerprint]
    for name in ("workers", "batch_size", "commit_every", "max_consecutive_errors"):
        if values.get(name) is not None:
            args += [f"--{flag_name(name)}", str(values[name])]
    args += ["--no-progress", "--allow-failed-clips"]  # failures are in the cache; --wait reports them
    if input_digest_mode() != "stat":
        args += ["--input-digest", input_digest_mode()]
    if values.get("force"):
        args.append("--force")
    if values.get("reuse_fit"):
        args += ["--reuse-fit", values["reuse_fit"]]
    for up_stage, selector in upstream_select.items():
        args += [f"--{up_stage}", selector if isinstance(selector, str) else ",".join(f"{k}={v}" for k, v in selector.items())]
    for p in stage.params:
        value = params.get(p.name)
        if value is None:
            continue
        if p.is_flag:
            args.append(p.option if value else f"--no-{flag_name(p.name)}")
        elif p.multiple:
            for v in value:
                args += [p.option, str(v)]
        else:
            args += [p.option, str(value)]
    return args
