"""The idle baseline: measure a machine's idle power once, cache it, subtract it everywhere.

    >>> from joules.measure import detect_meter
    >>> from joules.measure.idle import measure_idle, save_idle
    >>> meter = detect_meter(scope="system")                     # doctest: +SKIP
    >>> baseline = save_idle(measure_idle(meter, seconds=10))    # doctest: +SKIP
    >>> detect_meter(scope="system").idle_source                 # doctest: +SKIP
    'cached'

``joules idle --seconds 10`` does the same. The cache (``$JOULES_CACHE_DIR/idle.json``, default
``~/.cache/joules``) holds one baseline per host and backend setup (:meth:`Backend.idle_key`:
backend, domains, devices), so a baseline measured with two GPUs never applies to a run on one.
Domains whose idle comes from a model (the estimator in process scope) are never cached. Every
measurement then reports gross ``energy_j`` and ``net_energy_j`` = gross - idle power x duration,
with ``net_uncertainty_j`` adding the baseline's own uncertainty (cached per domain beside it)
times the duration to the gross uncertainty.
Measure idle with nothing else running: whatever runs is counted as idle.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joules.errors import ConfigError, MeterError
from joules.paths import cache_dir
from joules.serialize import atomic_write_json


def idle_cache_path() -> Path:
    return cache_dir() / "idle.json"


@dataclass
class IdleBaseline:
    """Idle power per domain of one meter on one host; ``domain_keys`` maps each domain to its
    backend's cache key (None for domains whose idle comes from a model, never cached)."""

    host: str
    idle_power_w: dict[str, float]
    domain_keys: dict[str, str | None]
    total_idle_power_w: float
    seconds: float
    method: str
    uncertainty_w: float
    measured_at: str
    # per domain: the idle window's sensor uncertainty over its duration (W)
    uncertainty_w_by_domain: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _full_key(backend_key: str) -> str:
    return f"{socket.gethostname()}|{backend_key}"


def measure_idle(
    meter: Any, seconds: float = 10.0, progress: Callable[[float], None] | None = None
) -> IdleBaseline:
    """Measure idle power over ``seconds`` with ``meter`` (nothing else should be running).

    ``progress`` is called with the elapsed fraction (0..1) about ten times a second.
    """
    if not seconds > 0:
        raise ConfigError(f"idle measurement needs seconds > 0, got {seconds}")
    keys = meter.domain_idle_keys()
    if not any(keys.values()):
        raise MeterError(
            "this meter's idle power comes from its model (process-scope estimate): "
            "measure idle with scope='system' (joules idle does)"
        )
    with meter.window("idle") as w:
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            if progress:
                progress(elapsed / seconds)
            time.sleep(min(0.1, seconds - elapsed))
    m = w.measurement
    if progress:
        progress(1.0)
    return IdleBaseline(
        host=socket.gethostname(),
        idle_power_w={k: d.energy_j / m.duration_s for k, d in m.domains.items()},
        domain_keys=keys,
        total_idle_power_w=m.avg_power_w,
        seconds=m.duration_s,
        method=m.method,
        uncertainty_w=m.uncertainty_j / m.duration_s,
        uncertainty_w_by_domain={k: d.uncertainty_j / m.duration_s for k, d in m.domains.items()},
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a corrupt cache is as good as none: the next `joules idle` rewrites it
    return data if isinstance(data, dict) else {}


def save_idle(baseline: IdleBaseline, path: Path | None = None) -> IdleBaseline:
    """Store ``baseline`` in the cache, one entry per backend setup (replacing older ones)."""
    path = path or idle_cache_path()
    data = _read_cache(path)
    for key in {k for k in baseline.domain_keys.values() if k}:
        doms = [d for d, k in baseline.domain_keys.items() if k == key]
        data[f"{baseline.host}|{key}"] = {
            "idle_power_w": {d: baseline.idle_power_w[d] for d in doms},
            "uncertainty_w": {
                d: baseline.uncertainty_w_by_domain[d]
                for d in doms
                if d in baseline.uncertainty_w_by_domain
            },
            "seconds": baseline.seconds,
            "method": baseline.method,
            "measured_at": baseline.measured_at,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=1)
    return baseline


def load_idle(backend_key: str, path: Path | None = None) -> dict[str, float] | None:
    """The cached idle power per domain of this backend setup on this host, or None."""
    found = load_idle_with_uncertainty(backend_key, path)
    return found[0] if found else None


def load_idle_with_uncertainty(
    backend_key: str, path: Path | None = None
) -> tuple[dict[str, float], dict[str, float]] | None:
    """(idle power, its uncertainty) per domain (W) of this backend setup on this host, or None.

    The uncertainty dict lacks the domains of a baseline cached before it was stored.
    """
    rec = _read_cache(path or idle_cache_path()).get(_full_key(backend_key))
    try:
        power = {str(k): float(v) for k, v in rec["idle_power_w"].items()}
        unc = {str(k): float(v) for k, v in (rec.get("uncertainty_w") or {}).items()}
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return power, unc
