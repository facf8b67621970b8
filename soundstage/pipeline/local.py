"""Running a stage on this machine: one shard, or several shards in parallel processes."""

from __future__ import annotations

from soundstage.pipeline.runner import Summary, plan_stage, run_stage
from soundstage.pipeline.shard import parse_shard, shard_from_env
from soundstage.pipeline.stage import Stage


def sub_shards(shard: tuple[int, int], jobs: int) -> list[tuple[int, int]]:
    """Split shard i/N into ``jobs`` shards of i/N: j*N + i of N*jobs (hash mod N*jobs == i mod N)."""
    i, n = shard
    return [(i + n * j, n * jobs) for j in range(jobs)]


def _run_shard(*args, **kwargs) -> Summary:
    # loky workers report "loky" as the start method, which the runner's own decoding pool
    # cannot use: give this process a standard one before the runner makes its pool.
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver"):
        multiprocessing.set_start_method("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn", force=True)
    return run_stage(*args, **kwargs)


def run_local(stage: Stage, manifest: str, cache: str, params: dict, upstream_select: dict | None = None,
              shard: str | tuple | None = None, jobs: int = 1, **runner_kwargs) -> Summary:
    if isinstance(shard, str):
        shard = parse_shard(shard)
    shard = shard or shard_from_env() or (0, 1)
    if jobs <= 1 or stage.kind == "global":
        return run_stage(stage, manifest, cache, params, upstream_select, shard=shard, **runner_kwargs)
    from joblib import Parallel, delayed

    if not runner_kwargs.get("fingerprint"):  # plan once here; the shard processes check, not recompute
        plan = plan_stage(stage, manifest, cache, params, upstream_select, log=runner_kwargs.get("log", print))
        plan.dir.initialise(plan.meta)
        runner_kwargs["fingerprint"] = plan.fingerprint

    runner_kwargs["progress"] = False  # N bars on one terminal are noise; the summary follows
    summaries = Parallel(n_jobs=jobs, backend="loky")(
        delayed(_run_shard)(stage, manifest, cache, params, upstream_select, shard=s, **runner_kwargs)
        for s in sub_shards(shard, jobs)
    )
    return Summary.merge(summaries)
