"""The Ray executor: one Ray task per run, results written to the store by the driver.

    $ joules sweep sweep.toml --executor ray                       # a local Ray instance
    $ joules sweep sweep.toml --executor ray --address ray://head:10001   # an existing cluster

Each run is a task with the resource request of the spec's ``[ray]`` table (``num_cpus``,
default 1; ``num_gpus``, default 0). Ask for a whole node's CPUs (or one GPU) when runs bench:
two runs sharing a node would time each other. Workers never touch the store: they get a copy
of the shared-work cache with their task and return new entries with their result; the driver
writes every result in its own transaction as it finishes, so an interrupted sweep resumes like
a local one. The baseline evaluations every compressed run pairs with go first, one task per
model, so they are computed once on the cluster too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from joules.errors import ConfigError
from joules.sweep.execute import (
    DictCache,
    Pool,
    RunOutcome,
    SweepProgress,
    baseline_evals,
    begin,
    eval_cache_key,
    execute_run,
    record,
)
from joules.sweep.spec import BASELINE, KeyEnv, RunConfig
from joules.sweep.stages import Stages
from joules.sweep.store import Store

_POOL: Pool | None = None  # per worker process: Ray reuses workers, so loaded models stay warm


def _worker_pool() -> Pool:
    global _POOL
    if _POOL is None:
        _POOL = Pool()
    return _POOL


def _baseline_task(
    cfg: dict[str, Any], stages: Stages, cache: dict[tuple[str, str], Any], env: KeyEnv
) -> dict[tuple[str, str], Any]:
    dc = DictCache(cache)
    baseline_evals(RunConfig.from_dict(cfg), stages, dc, _worker_pool(), env, SweepProgress())
    return dc.puts


def _run_task(
    cfg: dict[str, Any], stages: Stages, cache: dict[tuple[str, str], Any], env: KeyEnv
) -> tuple[RunOutcome, dict[tuple[str, str], Any]]:
    dc = DictCache(cache)
    outcome = execute_run(RunConfig.from_dict(cfg), stages, dc, _worker_pool(), env)
    return outcome, dc.puts


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at ``address`` (Ray itself retries
    for minutes). ``auto`` and addresses without a port are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address!r} ({exc.strerror or exc}): start one with "
            "`ray start --head` there, or drop --address to start a local one"
        ) from None


def run_ray(
    todo: Sequence[tuple[str, RunConfig]],
    store: Store,
    stages: Stages,
    env: KeyEnv,
    progress: SweepProgress,
    address: str | None,
    resources: dict[str, Any],
    skipped: int,
    supersedes: dict[str, list[str]] | None = None,
) -> list[tuple[tuple[str, RunConfig], RunOutcome]]:
    """Run ``todo`` on a Ray cluster; keys (``env``) are made here, on the driver, so the
    compute identity in them is the driver's (a cluster of unlike CPUs is keyed as the driver)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the ray executor needs Ray: pip install 'joules[ray]' (or use --executor local)"
        ) from None
    started = False
    if address:
        _check_reachable(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}"
            ) from None
        started = True
    opts = {
        "num_cpus": float(resources.get("num_cpus", 1)),
        "num_gpus": float(resources.get("num_gpus", 0)),
    }
    total = skipped + len(todo)
    out: list[tuple[tuple[str, RunConfig], RunOutcome]] = []
    try:
        baseline_remote = ray.remote(_baseline_task).options(**opts)
        run_remote = ray.remote(_run_task).options(**opts)
        progress.sweep(skipped, total)

        # Wave 1: each model's baseline evaluations, once, unless the store has them.
        cache = store.cache_items()
        need: dict[str, RunConfig] = {}
        for _, cfg in todo:
            if cfg.model not in need and any(
                ("eval", eval_cache_key(cfg, BASELINE, t, env)) not in cache for t in cfg.eval.tasks
            ):
                need[cfg.model] = cfg
        if need:
            progress.run_start(f"baseline evaluation of {len(need)} model(s) on ray")
            refs = [
                baseline_remote.remote(cfg.to_dict(), stages, cache, env) for cfg in need.values()
            ]
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    puts = ray.get(ready[0])
                except Exception:  # the runs needing it will fail with the reason
                    continue
                for (kind, key), value in puts.items():
                    store.cache_put(kind, key, value)
            cache = store.cache_items()

        # Wave 2: every run, results stored as they finish.
        by_ref = {}
        for key, cfg in todo:
            begin(store, key, cfg, env, supersedes or {})
            by_ref[run_remote.remote(cfg.to_dict(), stages, cache, env)] = (key, cfg)
        progress.run_start(f"{len(by_ref)} run(s) on ray")
        pending = list(by_ref)
        t0 = time.perf_counter()
        while pending:
            progress.phase(
                f"{len(pending)} run(s) in flight", len(by_ref) - len(pending), len(by_ref)
            )
            ready, pending = ray.wait(pending, num_returns=1)
            key, cfg = by_ref[ready[0]]
            try:
                outcome, puts = ray.get(ready[0])
            except Exception as exc:  # a worker crash, not an error inside the run
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                outcome = RunOutcome(
                    status="failed",
                    wall_s=time.perf_counter() - t0,
                    error=f"ray: {type(exc).__name__}: {msg}"[:500],
                )
                puts = {}
            for (kind, ckey), value in puts.items():
                store.cache_put(kind, ckey, value)
            record(store, key, outcome)
            progress.run_end(cfg.label, outcome.status)
            out.append(((key, cfg), outcome))
            progress.sweep(skipped + len(out), total)
    finally:
        if started:
            ray.shutdown()
    return out
