"""Execute one sweep run, shared by both executors: the pool of loaded and compressed models, the
evaluation and manifest caches, :func:`execute_run` and :func:`record`.

    >>> from joules.sweep.execute import Pool, DictCache, execute_run   # doctest: +SKIP
    >>> outcome = execute_run(cfg, stages, DictCache(), Pool(), env, SweepProgress())  # doctest: +SKIP

The local executor (:mod:`joules.sweep.runner`) and the Ray executor
(:mod:`joules.sweep.ray_executor`) both import this module and neither imports the other's
internals, so the two cannot drift apart and there is no import cycle between them.
"""

from __future__ import annotations

import json
import time
import traceback as tb
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from joules.fingerprint import sha
from joules.paths import cache_dir
from joules.sweep.results import (
    extract_metrics,
    jsonable,
    paired_accuracy_drop,
    paired_increase,
)
from joules.sweep.spec import BASELINE, KeyEnv, RunConfig, file_runtimes
from joules.sweep.stages import Stages
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


def _as_env(env: KeyEnv | dict[str, str]) -> KeyEnv:
    return env if isinstance(env, KeyEnv) else KeyEnv(versions=env)


def eval_cache_key(cfg: RunConfig, recipe: str, task: str, env: KeyEnv | dict[str, str]) -> str:
    """Key of one evaluation: model content, dtype, expanded recipe, calibration (compressed
    models only), task, eval protocol, library versions, compute identity."""
    env = _as_env(env)
    calib = None if recipe == BASELINE else asdict(cfg.calibration)
    parts = [env.model(cfg.model), cfg.dtype, env.recipe(recipe), calib, task, asdict(cfg.eval),
             dict(env.versions), dict(env.compute)]  # fmt: skip
    if cfg.eval.runtime != "torch" and cfg.deploy is not None:
        parts.append(asdict(cfg.deploy))  # the file evaluated depends on how it was written
    return sha(parts, 24)


def manifest_cache_key(cfg: RunConfig, env: KeyEnv | dict[str, str]) -> str:
    """Key of one compress manifest: model content, dtype, expanded recipe, calibration,
    library versions, compute identity."""
    env = _as_env(env)
    calib = None if cfg.recipe == BASELINE else asdict(cfg.calibration)
    return sha(
        [env.model(cfg.model), cfg.dtype, env.recipe(cfg.recipe), calib, dict(env.versions),
         dict(env.compute)],
        24,
    )  # fmt: skip


def file_cache_key(cfg: RunConfig, env: KeyEnv | dict[str, str]) -> str:
    """Key of one run's deployable file: its manifest's key and how the file is written."""
    return sha([manifest_cache_key(cfg, env), asdict(cfg.deploy) if cfg.deploy else None], 24)


def files_dir() -> Path:
    """Where the sweep keeps the deployable files it exported (``$JOULES_CACHE_DIR/sweep-files``):
    one per run key, reused by every sweep and store; ``joules recommend --export`` copies one
    out."""
    d = cache_dir() / "sweep-files"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _intact(facts: dict[str, Any] | None) -> bool:
    """A cached file record whose file is still there at its size (a deleted cache re-exports)."""
    if not facts or not facts.get("path"):
        return False
    p = Path(facts["path"])
    return p.is_file() and p.stat().st_size == facts.get("size_bytes")


def deployable_file(
    cfg: RunConfig,
    stages: Stages,
    cache: Cache,
    env: KeyEnv | dict[str, str],
    made: Callable[[], tuple[Any, dict[str, Any]]],
    tokenizer: Any,
    info: Any,
    timer: _Timer | None = None,
) -> dict[str, Any]:
    """The facts of ``cfg``'s deployable file (exported once per key; the cache holds its path,
    size, sha256 and tensor types). ``made()`` gives (model, manifest) when it must be written."""
    key = file_cache_key(cfg, env)
    hit = cache.get("file", key)
    if _intact(hit):
        return dict(hit)  # type: ignore[arg-type]
    model, manifest = made()
    path = files_dir() / f"{key}.gguf"
    phase = timer("export") if timer else _Phase({}, "export")
    with phase:
        facts = stages.need("export")(model, tokenizer, info, manifest, cfg.deploy, str(path))
    cache.put("file", key, facts)
    return facts


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
    env: KeyEnv | dict[str, str],
    progress: SweepProgress,
    timer: _Timer | None = None,
) -> dict[str, dict[str, Any]]:
    """The model's baseline evaluation of every task (from the cache, else computed and cached).

    Through a file runtime (``[eval] runtime = "llamacpp"``) the baseline is its own exported
    file, all float: the reference of every KL divergence."""
    out: dict[str, dict[str, Any]] = {}
    for task in cfg.eval.tasks:
        key = eval_cache_key(cfg, BASELINE, task, env)
        hit = cache.get("eval", key)
        if hit is None:
            model, tok, info = pool.model(stages, cfg)
            name = f"baseline {task}"
            phase = timer(name) if timer else _Phase({}, name)
            if cfg.eval.runtime != "torch":
                base_file = baseline_file(cfg, stages, cache, pool, env, timer)
                with phase:
                    hit = stages.need("evaluate_file")(
                        task, base_file["path"], tok, info, cfg.eval,
                        lambda d, t, n=name: progress.phase(n, d, t), base_file["path"],
                    )  # fmt: skip
            else:
                with phase:
                    hit = stages.need("evaluate")(
                        task, model, tok, info, cfg.eval,
                        lambda d, t, n=name: progress.phase(n, d, t),
                    )  # fmt: skip
            cache.put("eval", key, hit)
        out[task] = hit
    return out


def baseline_file(
    cfg: RunConfig,
    stages: Stages,
    cache: Cache,
    pool: Pool,
    env: KeyEnv | dict[str, str],
    timer: _Timer | None = None,
) -> dict[str, Any]:
    """The facts of the baseline's deployable file (all float; exported once per key)."""
    bcfg = replace(cfg, recipe=BASELINE)
    model, tok, info = pool.model(stages, cfg)
    return deployable_file(
        bcfg, stages, cache, env, lambda: (model, stages.baseline_manifest(model, info)),
        tok, info, timer,
    )  # fmt: skip


def execute_run(
    cfg: RunConfig,
    stages: Stages,
    cache: Cache,
    pool: Pool,
    env: KeyEnv | dict[str, str],
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

        mkey = manifest_cache_key(cfg, env)
        manifest = cache.get("manifest", mkey)
        if manifest is None:
            manifest = compressed_model()[1]
            cache.put("manifest", mkey, manifest)

        run_file: dict[str, Any] | None = None
        if cfg.needs_file:
            run_file = deployable_file(
                cfg, stages, cache, env, lambda: (compressed_model()[0], manifest), tok, info, timer
            )
        base_evals = baseline_evals(cfg, stages, cache, pool, env, progress, timer)
        evals: dict[str, Any] = {}
        for task in cfg.eval.tasks:
            if cfg.recipe == BASELINE:
                ev = dict(base_evals[task])
            else:
                key = eval_cache_key(cfg, cfg.recipe, task, env)
                ev = cache.get("eval", key)
                if ev is None:
                    name = f"eval {task}"
                    if cfg.eval.runtime != "torch":
                        assert run_file is not None  # the spec sets [deploy] for file runtimes
                        base_file = baseline_file(cfg, stages, cache, pool, env, timer)
                        with timer(name):
                            ev = stages.need("evaluate_file")(
                                task, run_file["path"], tok, info, cfg.eval,
                                lambda d, t, n=name: progress.phase(n, d, t), base_file["path"],
                            )  # fmt: skip
                    else:
                        model = compressed_model()[0]
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
                if ev.get("item_correct") and b.get("item_correct"):
                    ev["paired_accuracy"] = asdict(
                        paired_accuracy_drop(
                            ev["item_correct"], ev["items"], b["item_correct"], b["items"]
                        )
                    )
            evals[task] = ev
        if cfg.recipe == BASELINE:
            for ev in evals.values():
                if ev.get("item_correct"):
                    c, items = ev["item_correct"], ev["items"]
                    ev["paired_accuracy"] = asdict(paired_accuracy_drop(c, items, c, items))
                if ev.get("window_nll"):
                    n = len(ev["window_nll"])
                    ev["paired"] = asdict(
                        paired_increase(
                            [0.0] * n, ev["window_tokens"], [0.0] * n, ev["window_tokens"]
                        )
                    )

        bench = None
        bench_file = cfg.bench is not None and cfg.bench.runtime in file_runtimes()
        if cfg.bench is not None:
            if bench_file:
                assert run_file is not None  # the spec sets [deploy] for file runtimes
                model = run_file["path"]
            else:
                model = compressed_model()[0]
            # Timed phase: the local executor runs one run at a time, so nothing else of the
            # sweep runs while this measures.
            with timer("bench"):
                bench = stages.need("bench")(
                    model, tok, info, cfg.bench, lambda d, t: progress.phase("bench", d, t)
                )
            if stages.layer_paths is not None and cfg.recipe != BASELINE and not bench_file:
                # Which kernels the timed forwards ran: speed of emulated layers is labelled so
                # (counts), and per layer for the report's per-format table.
                paths = stages.layer_paths(model)
                manifest = {
                    **manifest,
                    "linear_paths": dict(Counter(paths.values())),
                    "layer_paths": paths,
                }
        if run_file is not None:
            manifest = with_file(manifest, run_file, cfg)
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


def with_file(manifest: dict[str, Any], facts: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """The manifest of a run that ships a file: ``deploy`` holds the file's facts, and the
    size and bits per weight are the file's (what a user ships); joules' in-memory figures stay
    as ``torch_model_bytes`` / ``torch_bits_per_weight``."""
    runtimes = sorted({r for r in (cfg.eval.runtime, cfg.bench.runtime if cfg.bench else None)
                       if r and r != "torch" and r in file_runtimes()})  # fmt: skip
    out = dict(manifest)
    out["torch_model_bytes"] = manifest.get("model_bytes")
    out["torch_bits_per_weight"] = manifest.get("bits_per_weight")
    out["model_bytes"] = facts["size_bytes"]
    if facts.get("bits_per_weight") is not None:
        out["bits_per_weight"] = facts["bits_per_weight"]
    out["deploy"] = {"runtime": "/".join(runtimes), "gguf": dict(facts)}
    if cfg.bench is not None and cfg.bench.runtime in runtimes:
        out["linear_paths"] = {"llamacpp": 1}  # llama.cpp's own kernels: never emulated
    return out


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


def begin(
    store: Store, key: str, cfg: RunConfig, env: KeyEnv, supersedes: dict[str, list[str]]
) -> None:
    """Mark a run as running with its key components, and the stored runs it re-does as
    superseded by it (they are stale: analyses read this one from now on)."""
    store.begin_run(
        key, cfg.model, cfg.recipe, workload_label(cfg), cfg.to_dict(), dict(env.versions),
        key_parts=cfg.key_parts(env),
    )  # fmt: skip
    store.supersede(supersedes.get(key, []), key)
