"""Run a sweep: plan the runs, skip the finished ones, execute the rest, store each result.

    >>> from joules.sweep import load_spec, run_sweep        # doctest: +SKIP
    >>> summary = run_sweep(load_spec("sweep.toml"), "joules.db")  # doctest: +SKIP
    >>> summary.ran, summary.skipped                          # doctest: +SKIP
    (4, 0)

Resuming: a run whose key is ``done`` in the store is skipped; a ``failed`` one is re-tried only
with ``retry_failed``; a ``running`` one (its process died) is re-done.

Keys (:class:`~joules.sweep.spec.KeyEnv`, :mod:`joules.fingerprint`): a run's key hashes its
config, its recipe with every default expanded, the model's content, the library versions with
the joules code fingerprint, and the compute identity; the components are stored beside the
key. A done run of the same config under another key is *stale*: the sweep names it with what
changed (code, versions, model, recipe defaults, compute) and re-runs it (the old row is marked
superseded, so analyses see the new one); ``reuse_stale`` keeps it instead, marked stale in the
store and in the summary.

Shared work, computed once:

* the loaded model, per (model, dtype), in the process (a Ray worker keeps its own);
* calibration tokens, per (model, calibration spec), in the process (their sha256 goes into
  the manifest);
* the compressed model, per (model, recipe, calibration), in the process: the last one is
  kept, and runs of one recipe are adjacent, so several bench workloads compress once;
* evaluations, per (model content, dtype, expanded recipe, calibration, task, eval protocol,
  versions, compute identity), in the store's ``cache`` table (kind ``eval``): the baseline
  evaluation every compressed run is paired with is computed once per model and task, and
  survives restarts;
* manifests, per (model content, dtype, expanded recipe, calibration, versions, compute
  identity), in the ``cache`` table (kind ``manifest``), so predictions need no re-compression.

GPTQ's Hessians (per recipe prefix) belong to ``joules.compress``; the sweep does not cache them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from joules.errors import ConfigError, JoulesError
from joules.fingerprint import compute_identity, library_versions
from joules.sweep.execute import (
    Pool,
    RunOutcome,
    StoreCache,
    SweepProgress,
    _as_env,
    begin,
    execute_run,
    record,
)
from joules.sweep.ray_executor import run_ray
from joules.sweep.spec import BASELINE, KeyEnv, RunConfig, SweepSpec
from joules.sweep.stages import Stages, default_stages
from joules.sweep.store import Store


def default_model_identity(spec: str) -> Any:
    """A model spec by content (:func:`joules.models.loading.model_identity`); a spec that does
    not resolve keys by its text (its runs fail at load, with the reason)."""
    try:
        from joules.models.loading import model_identity
    except ImportError:  # pragma: no cover - joules.models is part of joules
        return {"unresolved": spec}
    try:
        return model_identity(spec)
    except (JoulesError, OSError):
        return {"unresolved": spec}


def expanded_recipe(recipe: str) -> Any:
    """A recipe with every step's defaults expanded (``joules.compress``), or its text when it
    is not a joules recipe (the fake stages' ``round(bits=N)``)."""
    if recipe == BASELINE:
        return []
    try:
        from joules.compress.recipe import expand_recipe
    except ImportError:
        return recipe
    try:
        return expand_recipe(recipe)
    except ConfigError:
        return recipe


def key_env(
    spec: SweepSpec,
    versions: dict[str, str] | None = None,
    *,
    compute: dict[str, Any] | None = None,
    model_identity: Callable[[str], Any] | None = None,
) -> KeyEnv:
    """Everything a run key holds beside the run's config, resolved once per sweep."""
    identify = model_identity or default_model_identity
    return KeyEnv(
        versions=dict(versions or library_versions()),
        compute=dict(compute if compute is not None else compute_identity()),
        models={m: identify(m) for m in spec.models},
        recipes={r: expanded_recipe(r) for r in spec.recipes},
    )


@dataclass
class SweepSummary:
    total: int
    skipped: int  # finished before this sweep started
    ran: int
    failed: int
    failed_before: int  # failed earlier and not re-tried (pass --retry-failed)
    wall_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label, error)
    # stale: done under another key (code, versions, model, recipe defaults or compute changed)
    stale_rerun: list[tuple[str, list[str]]] = field(default_factory=list)  # (label, reasons)
    stale_reused: list[tuple[str, list[str]]] = field(default_factory=list)  # --reuse-stale


@dataclass
class Plan:
    """What a sweep will do: runs to do, and what it found in the store."""

    todo: list[tuple[str, RunConfig]]
    done: int  # done under their current key (or stale and reused)
    failed: int  # failed earlier and left alone
    key_parts: dict[str, dict[str, Any]]  # key -> what it hashes (stored with the run)
    supersedes: dict[str, list[str]]  # key -> the stored keys of the same config it re-does
    stale_rerun: list[tuple[str, list[str]]] = field(default_factory=list)
    stale_reused: list[tuple[str, list[str]]] = field(default_factory=list)


def _config_id(config: dict[str, Any] | None) -> str | None:
    """A stored config's id as this joules reads it (fields added since take their defaults),
    or None when it cannot be read (another schema of config)."""
    if not config:
        return None
    try:
        return RunConfig.from_dict(config).config_id()
    except (KeyError, TypeError, ValueError):
        return None


def _diff_dict(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{k} {old.get(k, 'absent')} → {new.get(k, 'absent')}"
        for k in sorted(set(old) | set(new), key=str)
        if old.get(k) != new.get(k)
    ]


def _recipe_diff(old: Any, new: Any) -> str:
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and all(isinstance(o, dict) and isinstance(n, dict) for o, n in zip(old, new, strict=True))
        and [o.get("name") for o in old] == [n.get("name") for n in new]
    ):
        changes = []
        for o, n in zip(old, new, strict=True):
            changes += [f"{n.get('name')}.{c}" for c in _diff_dict(o, n)]
        return "recipe defaults: " + "; ".join(changes)
    return "recipe defaults: the expanded recipe changed"


def stale_reasons(
    old: dict[str, Any] | None, old_versions: dict[str, str], new: dict[str, Any]
) -> list[str]:
    """Why a stored run's key differs from the key its config has now, one reason per changed
    component: code, versions, model, recipe defaults, compute. ``old`` is the stored key
    components (None for a run stored before joules recorded them; its versions still count)."""
    reasons: list[str] = []
    ov = dict((old or {}).get("versions") or old_versions or {})
    nv = dict(new.get("versions") or {})
    if ov.get("joules_code") != nv.get("joules_code"):
        if "joules_code" in ov:
            reasons.append(
                f"code: the joules source changed ({ov['joules_code']} → {nv.get('joules_code')})"
            )
        else:
            reasons.append("code: stored before joules recorded its code fingerprint")
    libs = _diff_dict(
        {k: v for k, v in ov.items() if k != "joules_code"},
        {k: v for k, v in nv.items() if k != "joules_code"},
    )
    if libs:
        reasons.append("versions: " + "; ".join(libs))
    if old is None:
        reasons.append(
            "stored by an older joules, without the model's content hash, the expanded recipe "
            "or the compute identity"
        )
        return reasons
    om, nm = old.get("model"), new.get("model")
    if om != nm:
        files = []
        if isinstance(om, dict) and isinstance(nm, dict):
            of, nf = om.get("files") or {}, nm.get("files") or {}
            files = sorted(f for f in set(of) | set(nf) if of.get(f) != nf.get(f))
        what = f" ({', '.join(files[:4])})" if files else ""
        spec = new.get("config", {}).get("model", "")
        reasons.append(f"model: the content of {spec} changed{what}")
    if old.get("recipe") != new.get("recipe"):
        reasons.append(_recipe_diff(old.get("recipe"), new.get("recipe")))
    oc, nc = old.get("compute") or {}, new.get("compute") or {}
    if oc != nc:
        reasons.append("compute: " + "; ".join(_diff_dict(oc, nc)))
    if not reasons:  # pragma: no cover - a key made by another scheme of keys
        reasons.append("the key scheme changed")
    return reasons


def plan(
    spec: SweepSpec,
    store: Store,
    env: KeyEnv | dict[str, str],
    retry_failed: bool,
    reuse_stale: bool = False,
) -> Plan:
    """Which runs to do: not done under their current key, not failed (unless retried).

    A done run stored under another key of the same config is stale: it is re-done (and the
    stored one superseded once the new one starts), or with ``reuse_stale`` counted as done and
    marked stale in the store with the reasons."""
    env = _as_env(env)
    records = store.key_records()
    status = {r["key"]: r["status"] for r in records}
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cid = _config_id(r["config"])
        if cid is not None:
            by_config.setdefault(cid, []).append(r)
    p = Plan(todo=[], done=0, failed=0, key_parts={}, supersedes={})
    for cfg in spec.runs():
        parts, key = cfg.key_parts(env), cfg.key(env)
        others = [r for r in by_config.get(cfg.config_id(), []) if r["key"] != key]
        s = status.get(key)
        if s == "done":
            p.done += 1
            mine = next(r for r in records if r["key"] == key)
            if mine["stale"] or mine["superseded_by"]:
                # current again (a code change was undone): analyses read this run again
                store.make_current(key)
            store.supersede([r["key"] for r in others if r["superseded_by"] is None], key)
            continue
        if s == "failed" and not retry_failed:
            p.failed += 1
            continue
        stale = [r for r in others if r["status"] == "done" and r["superseded_by"] in (None, key)]
        if stale:
            old = stale[-1]
            reasons = stale_reasons(old["key_parts"], old["versions"], parts)
            if reuse_stale:
                store.mark_stale(old["key"], reasons)
                p.stale_reused.append((cfg.label, reasons))
                p.done += 1
                continue
            p.stale_rerun.append((cfg.label, reasons))
        p.todo.append((key, cfg))
        p.key_parts[key] = parts
        p.supersedes[key] = [r["key"] for r in others if r["superseded_by"] is None]
    return p


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
    reuse_stale: bool = False,
    compute: dict[str, Any] | None = None,
    model_identity: Callable[[str], Any] | None = None,
) -> SweepSummary:
    """Execute every run of ``spec`` not finished in ``store``; each result is stored as it ends.

    ``versions``, ``compute`` and ``model_identity`` override what keys hold (tests; see
    :func:`key_env`). Stale runs (same config, another key) are re-done unless
    ``reuse_stale``; the summary lists them with the reasons either way."""
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
        env = key_env(spec, versions, compute=compute, model_identity=model_identity)
        progress = progress or SweepProgress()
        p = plan(spec, st, env, retry_failed, reuse_stale)
        todo, skipped, failed_before = p.todo, p.done, p.failed
        total = skipped + len(todo)
        if executor == "ray":
            outcomes = run_ray(
                todo, st, stages, env, progress, address, spec.ray, skipped, p.supersedes
            )
        else:
            outcomes = _run_local(todo, st, stages, env, progress, skipped, total, p.supersedes)
        failures = [(cfg.label, o.error or "") for (_, cfg), o in outcomes if o.status == "failed"]
        return SweepSummary(
            total=total + failed_before,
            skipped=skipped,
            ran=len(outcomes),
            failed=len(failures),
            failed_before=failed_before,
            wall_s=time.perf_counter() - t0,
            failures=failures,
            stale_rerun=p.stale_rerun,
            stale_reused=p.stale_reused,
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
    env: KeyEnv,
    progress: SweepProgress,
    skipped: int,
    total: int,
    supersedes: dict[str, list[str]] | None = None,
) -> list[tuple[tuple[str, RunConfig], RunOutcome]]:
    pool, cache = Pool(), StoreCache(store)
    out = []
    progress.sweep(skipped, total)
    for i, (key, cfg) in enumerate(todo):
        begin(store, key, cfg, env, supersedes or {})
        progress.run_start(cfg.label)
        outcome = execute_run(cfg, stages, cache, pool, env, progress)
        record(store, key, outcome)
        progress.run_end(cfg.label, outcome.status)
        progress.sweep(skipped + i + 1, total)
        out.append(((key, cfg), outcome))
    return out
