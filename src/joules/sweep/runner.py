"""Run a sweep: plan the runs, skip the finished ones, execute the rest, store each result.

    >>> from joules.sweep import load_spec, run_sweep        # doctest: +SKIP
    >>> summary = run_sweep(load_spec("sweep.toml"), "joules.db")  # doctest: +SKIP
    >>> summary.ran, summary.skipped                          # doctest: +SKIP
    (4, 0)

Resuming: a run whose key is ``done`` in the store is skipped; a ``failed`` one is re-tried only
with ``retry_failed``; a ``running`` one (its process died) is re-done.

Shared work, computed once:

* the loaded model, per (model, dtype), in the process (a Ray worker keeps its own);
* calibration tokens, per (model, calibration spec), in the process (their sha256 goes into
  the manifest);
* the compressed model, per (model, recipe, calibration), in the process: the last one is
  kept, and runs of one recipe are adjacent, so several bench workloads compress once;
* evaluations, per (model, dtype, recipe, calibration, task, eval protocol, versions), in the
  store's ``cache`` table (kind ``eval``): the baseline evaluation every compressed run is
  paired with is computed once per model and task, and survives restarts;
* manifests, per (model, dtype, recipe, calibration, versions), in the ``cache`` table (kind
  ``manifest``), so predictions need no re-compression.

GPTQ's Hessians (per recipe prefix) belong to ``joules.compress``; the sweep does not cache them.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import traceback as tb
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from joules.errors import ConfigError
from joules.sweep.results import extract_metrics, jsonable, paired_increase
from joules.sweep.spec import BASELINE, RunConfig, SweepSpec
from joules.sweep.stages import Stages, default_stages
from joules.sweep.store import Metric, Store


class SweepProgress:
    """Progress callbacks (no-ops here; the CLI draws rich bars)."""

    def sweep(self, done: int, total: int) -> None: ...

    def run_start(self, label: str) -> None: ...

    def phase(self, name: str, done: int | None = None, total: int | None = None) -> None: ...

    def run_end(self, label: str, status: str) -> None: ...


class Cache(Protocol):
    def get(self, kind: str, key: str) -> Any | None: ...

    def put(self, kind: str, key: str, value: Any) -> None: ...


class StoreCache:
    """The cache table of a store (local executor: every entry is its own transaction)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, kind: str, key: str) -> Any | None:
        return self.store.cache_get(kind, key)

    def put(self, kind: str, key: str, value: Any) -> None:
        self.store.cache_put(kind, key, value)


class DictCache:
    """A copy of the cache shipped to a remote worker; new entries come back in ``puts``."""

    def __init__(self, items: dict[tuple[str, str], Any]) -> None:
        self.items = dict(items)
        self.puts: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, key: str) -> Any | None:
        return self.items.get((kind, key))

    def put(self, kind: str, key: str, value: Any) -> None:
        value = json.loads(json.dumps(jsonable(value)))
        self.items[(kind, key)] = value
        self.puts[(kind, key)] = value


def library_versions() -> dict[str, str]:
    """Versions that enter every run key: a new joules, torch or transformers re-runs a sweep."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("joules", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:24]


def eval_cache_key(cfg: RunConfig, recipe: str, task: str, versions: dict[str, str]) -> str:
    calib = None if recipe == BASELINE else asdict(cfg.calibration)
    return _sha([cfg.model, cfg.dtype, recipe, calib, task, asdict(cfg.eval), versions])


def manifest_cache_key(cfg: RunConfig, versions: dict[str, str]) -> str:
    calib = None if cfg.recipe == BASELINE else asdict(cfg.calibration)
    return _sha([cfg.model, cfg.dtype, cfg.recipe, calib, versions])


class Pool:
    """Per-process shared work: loaded models, calibration tokens, the last compressed model."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.calib: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}
        self.compressed: tuple[tuple[Any, ...], tuple[Any, dict[str, Any]]] | None = None

    def model(self, stages: Stages, cfg: RunConfig) -> tuple[Any, Any, Any]:
        k = (cfg.model, cfg.dtype)
        if k not in self.models:
            self.models.clear()  # one base model in memory at a time (runs are grouped by model)
            self.compressed = None
            self.models[k] = stages.load(cfg.model, cfg.dtype)
        return self.models[k]

    def calibration(
        self, stages: Stages, cfg: RunConfig, tokenizer: Any
    ) -> tuple[Any, dict[str, Any]]:
        k = (cfg.model, json.dumps(asdict(cfg.calibration), sort_keys=True))
        if k not in self.calib:
            self.calib[k] = stages.need("calibration")(tokenizer, cfg.calibration)
        return self.calib[k]


@dataclass
class RunOutcome:
    status: str  # "done" | "failed"
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    eval: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    predictions: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    metrics: list[Metric] = field(default_factory=list)


class _Timer:
    def __init__(self, timings: dict[str, float], progress: SweepProgress) -> None:
        self.timings, self.progress, self.current = timings, progress, "setup"

    def __call__(self, name: str) -> _Phase:
        self.current = name
        self.progress.phase(name)
        return _Phase(self.timings, name)


class _Phase:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


def baseline_evals(
    cfg: RunConfig,
    stages: Stages,
    cache: Cache,
    pool: Pool,
    versions: dict[str, str],
    progress: SweepProgress,
    timer: _Timer | None = None,
) -> dict[str, dict[str, Any]]:
    """The model's baseline evaluation of every task (from the cache, else computed and cached)."""
    out: dict[str, dict[str, Any]] = {}
    for task in cfg.eval.tasks:
        key = eval_cache_key(cfg, BASELINE, task, versions)
        hit = cache.get("eval", key)
        if hit is None:
            model, tok, info = pool.model(stages, cfg)
            name = f"baseline {task}"
            phase = timer(name) if timer else _Phase({}, name)
            with phase:
                hit = stages.need("evaluate")(
                    task, model, tok, info, cfg.eval, lambda d, t, n=name: progress.phase(n, d, t)
                )
            cache.put("eval", key, hit)
        out[task] = hit
    return out


def execute_run(
    cfg: RunConfig,
    stages: Stages,
    cache: Cache,
    pool: Pool,
    versions: dict[str, str],
    progress: SweepProgress | None = None,
) -> RunOutcome:
    """Run one configuration; any error becomes a failed outcome with a one-line message."""
    progress = progress or SweepProgress()
    timings: dict[str, float] = {}
    timer = _Timer(timings, progress)
    t0 = time.perf_counter()
    try:
        with timer("load"):
            base, tok, info = pool.model(stages, cfg)
        compressed: tuple[Any, dict[str, Any]] | None = None

        def compressed_model() -> tuple[Any, dict[str, Any]]:
            nonlocal compressed
            if cfg.recipe == BASELINE:
                return base, stages.baseline_manifest(base, info)
            ck = (cfg.model, cfg.dtype, cfg.recipe, cfg.calibration)
            if pool.compressed is not None and pool.compressed[0] == ck:
                return pool.compressed[1]
            if compressed is None:
                with timer("calibration"):
                    calib = pool.calibration(stages, cfg, tok)
                pool.compressed = None  # free the previous compressed model first
                with timer("compress"):
                    compressed = stages.need("compress")(
                        base,
                        cfg.recipe,
                        calib,
                        tok,
                        info,
                        lambda d, t: progress.phase("compress", d, t),
                    )
                pool.compressed = (ck, compressed)
            return compressed

        mkey = manifest_cache_key(cfg, versions)
        manifest = cache.get("manifest", mkey)
        if manifest is None:
            manifest = compressed_model()[1]
            cache.put("manifest", mkey, manifest)

        base_evals = baseline_evals(cfg, stages, cache, pool, versions, progress, timer)
        evals: dict[str, Any] = {}
        for task in cfg.eval.tasks:
            if cfg.recipe == BASELINE:
                ev = dict(base_evals[task])
            else:
                key = eval_cache_key(cfg, cfg.recipe, task, versions)
                ev = cache.get("eval", key)
                if ev is None:
                    model = compressed_model()[0]
                    name = f"eval {task}"
                    with timer(name):
                        ev = stages.need("evaluate")(
                            task, model, tok, info, cfg.eval,
                            lambda d, t, n=name: progress.phase(n, d, t),
                        )  # fmt: skip
                    cache.put("eval", key, ev)
                ev = dict(ev)
                b = base_evals[task]
                if ev.get("window_nll") and b.get("window_nll"):
                    ev["paired"] = asdict(
                        paired_increase(
                            ev["window_nll"], ev["window_tokens"],
                            b["window_nll"], b["window_tokens"],
                        )
                    )  # fmt: skip
            evals[task] = ev
        if cfg.recipe == BASELINE:
            for ev in evals.values():
                if ev.get("window_nll"):
                    n = len(ev["window_nll"])
                    ev["paired"] = asdict(
                        paired_increase(
                            [0.0] * n, ev["window_tokens"], [0.0] * n, ev["window_tokens"]
                        )
                    )

        bench = None
        if cfg.bench is not None:
            model = compressed_model()[0]
            # Timed phase: the local executor runs one run at a time, so nothing else of the
            # sweep runs while this measures.
            with timer("bench"):
                bench = stages.need("bench")(
                    model, tok, info, cfg.bench, lambda d, t: progress.phase("bench", d, t)
                )
            if stages.layer_paths is not None and cfg.recipe != BASELINE:
                # Which kernels the timed forwards ran: speed of emulated layers is labelled so
                # (counts), and per layer for the report's per-format table.
                paths = stages.layer_paths(model)
                manifest = {
                    **manifest,
                    "linear_paths": dict(Counter(paths.values())),
                    "layer_paths": paths,
                }
        predictions = None
        if cfg.hardware:
            predictions = {}
            for hw in cfg.hardware:
                with timer(f"predict {hw}"):
                    predictions[hw] = stages.need("predict")(base, info, manifest, hw, cfg.bench)
        result = RunOutcome(
            status="done",
            wall_s=time.perf_counter() - t0,
            timings=timings,
            eval=jsonable(evals),
            bench=jsonable(bench),
            predictions=jsonable(predictions),
            manifest=jsonable(manifest),
        )
        result.metrics = extract_metrics(
            result.eval, result.bench, result.predictions, result.manifest
        )
        return result
    except Exception as exc:  # stored with the run; re-tried with --retry-failed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{timer.current}: {type(exc).__name__}: {msg}"[:500]
        return RunOutcome(
            status="failed",
            wall_s=time.perf_counter() - t0,
            timings=timings,
            error=error,
            traceback=tb.format_exc(),
        )


def record(store: Store, key: str, outcome: RunOutcome) -> None:
    """Write one outcome in one transaction."""
    if outcome.status == "done":
        store.finish_run(
            key,
            wall_s=outcome.wall_s,
            timings=outcome.timings,
            eval=outcome.eval,
            bench=outcome.bench,
            predictions=outcome.predictions,
            manifest=outcome.manifest,
            metrics=outcome.metrics,
        )
    else:
        store.fail_run(
            key,
            error=outcome.error or "unknown error",
            traceback=outcome.traceback,
            wall_s=outcome.wall_s,
            timings=outcome.timings,
        )


def workload_label(cfg: RunConfig) -> str | None:
    b = cfg.bench
    return None if b is None else f"p{b.prompt_len}/g{b.gen_len}/b{b.batch}/{b.runtime}"


@dataclass
class SweepSummary:
    total: int
    skipped: int  # finished before this sweep started
    ran: int
    failed: int
    failed_before: int  # failed earlier and not re-tried (pass --retry-failed)
    wall_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label, error)


def plan(
    spec: SweepSpec, store: Store, versions: dict[str, str], retry_failed: bool
) -> tuple[list[tuple[str, RunConfig]], int, int]:
    """(runs to do, how many are done, how many failed and are left alone)."""
    status = store.statuses()
    todo, done, failed = [], 0, 0
    for cfg in spec.runs():
        key = cfg.key(versions)
        s = status.get(key)
        if s == "done":
            done += 1
        elif s == "failed" and not retry_failed:
            failed += 1
        else:
            todo.append((key, cfg))
    return todo, done, failed


def run_sweep(
    spec: SweepSpec,
    store: str | Store,
    *,
    executor: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    stages: Stages | None = None,
    progress: SweepProgress | None = None,
    versions: dict[str, str] | None = None,
) -> SweepSummary:
    """Execute every run of ``spec`` not finished in ``store``; each result is stored as it ends."""
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}: choose local or ray")
    if address and executor != "ray":
        raise ConfigError("--address is for the ray executor: add --executor ray")
    t0 = time.perf_counter()
    own = not isinstance(store, Store)
    st = Store(store) if own else store
    lock = _writer_lock(st.path)
    try:
        stages = stages or default_stages()
        versions = versions or library_versions()
        progress = progress or SweepProgress()
        todo, skipped, failed_before = plan(spec, st, versions, retry_failed)
        total = skipped + len(todo)
        if executor == "ray":
            from joules.sweep.ray_executor import run_ray

            outcomes = run_ray(todo, st, stages, versions, progress, address, spec.ray, skipped)
        else:
            outcomes = _run_local(todo, st, stages, versions, progress, skipped, total)
        failures = [(cfg.label, o.error or "") for (_, cfg), o in outcomes if o.status == "failed"]
        return SweepSummary(
            total=total + failed_before,
            skipped=skipped,
            ran=len(outcomes),
            failed=len(failures),
            failed_before=failed_before,
            wall_s=time.perf_counter() - t0,
            failures=failures,
        )
    finally:
        if lock is not None:
            lock.close()
        if own:
            st.close()


def _writer_lock(path: str) -> Any:
    """Hold ``<store>.lock`` for the sweep: two sweeps writing one store would each take the
    other's running runs for interrupted ones and redo them."""
    if path == ":memory:":
        return None
    import fcntl

    f = open(f"{path}.lock", "w")  # noqa: SIM115  (held until the sweep ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(
            f"another sweep is writing {path!r}: wait for it to finish, or use another --store"
        ) from None
    return f


def _run_local(
    todo: Sequence[tuple[str, RunConfig]],
    store: Store,
    stages: Stages,
    versions: dict[str, str],
    progress: SweepProgress,
    skipped: int,
    total: int,
) -> list[tuple[tuple[str, RunConfig], RunOutcome]]:
    pool, cache = Pool(), StoreCache(store)
    out = []
    progress.sweep(skipped, total)
    for i, (key, cfg) in enumerate(todo):
        store.begin_run(key, cfg.model, cfg.recipe, workload_label(cfg), cfg.to_dict(), versions)
        progress.run_start(cfg.label)
        outcome = execute_run(cfg, stages, cache, pool, versions, progress)
        record(store, key, outcome)
        progress.run_end(cfg.label, outcome.status)
        progress.sweep(skipped + i + 1, total)
        out.append(((key, cfg), outcome))
    return out
