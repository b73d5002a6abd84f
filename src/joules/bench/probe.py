"""This machine's speed of light: achievable memory bandwidth and peak matmul FLOP/s.

    >>> from joules.bench.probe import probe_machine
    >>> lim = probe_machine(threads=1, buffer_bytes=8 << 20, matmul_n=256, repeats=2, save=False)
    >>> lim.read_bw_bytes_s > 0 and lim.peak_flops["fp32"] > 0
    True

``joules bench --probe`` measures, with the given thread count:

- ``read_bw_bytes_s``: a sum over a buffer far larger than the last-level cache (default 256 MiB,
  fp32), bytes read ÷ time, best of ``repeats``;
- ``triad_bw_bytes_s``: STREAM's triad ``a = b + s·c`` (counted as 3 × the array bytes, as
  STREAM does; write-allocate traffic is not counted), best of ``repeats``;
- ``peak_flops``: ``{"fp32": ..., "bf16": ...}``, 2·n³ ÷ time of an n×n ``F.linear`` (the
  call every transformers linear makes; on CPUs without native bf16, torch's bf16 ``mm`` is far
  slower than ``F.linear``, so the layout matters), best of ``repeats``.

Best-of-N is the achievable rate, the right denominator for a "fraction of the speed of light".

A probe beside other jobs can be off several times over. Each probe records the machine's load
(``load``: :func:`joules.runtime_dtype.machine_load`, 1-minute load average, this process's
share, cores, ``busy``). A busy probe never replaces a quiet cached one, and is merged with a
busy cached one by the best of each rate (both are achievable rates; other jobs only lower
them); :func:`load_machine_limits` does not return a busy entry until ``MAX_BUSY_PROBES`` busy
probes have been merged, so the next bench probes again instead of taking it as the machine's
truth.

Cache file (read by ``joules predict`` through :func:`load_machine_limits`):
``$JOULES_CACHE_DIR/machine_limits.json`` =
``{"version": 1, "entries": {"<cpu model>|<threads>": MachineLimits.to_dict()}}`` where
``to_dict()`` is ``{"cpu_model": str, "threads": int, "read_bw_bytes_s": float,
"triad_bw_bytes_s": float, "peak_flops": {"fp32": float, "bf16": float}, "buffer_bytes": int,
"matmul_n": int, "repeats": int, "device": "cpu", "torch": str, "probed_unix_s": float,
"load": {"load_1m": float, "own_1m": float, "cores": int, "busy": bool} | null, "probes": int}``
(entries written before loads were recorded have no ``load`` and are used as they are).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from joules import dtypes
from joules.errors import ConfigError
from joules.paths import cache_dir
from joules.runtime_dtype import MAX_BUSY_PROBES, best_time_s, machine_load
from joules.serialize import atomic_write_json
from joules.system import cpu_model

CACHE_FILE = "machine_limits.json"
_DTYPES = dtypes.choices("fp32", "bf16")


@dataclass(frozen=True)
class MachineLimits:
    """Measured limits of this machine for a thread count (see the module docstring)."""

    cpu_model: str
    threads: int
    read_bw_bytes_s: float
    triad_bw_bytes_s: float
    peak_flops: dict[str, float] = field(default_factory=dict)
    buffer_bytes: int = 0
    matmul_n: int = 0
    repeats: int = 0
    device: str = "cpu"
    torch: str = ""
    probed_unix_s: float = 0.0
    load: dict[str, Any] | None = None  # MachineLoad.to_dict() of the (last) probe
    probes: int = 1  # busy probes merged into these figures (best of each rate)

    @property
    def busy(self) -> bool:
        """Probed beside other jobs (the figures may be low)."""
        return bool(self.load and self.load.get("busy"))

    @property
    def key(self) -> str:
        return f"{self.cpu_model}|{self.threads}"

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype ("fp32", "bf16"; torch names accepted)."""
        name = dtypes.short_name(dtypes.to_torch(dtype)) if dtypes.is_known(dtype) else dtype
        return self.peak_flops.get(name, self.peak_flops.get("fp32", float("nan")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineLimits:
        return cls(**d)


@contextmanager
def _threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _bandwidth_times(n: int, repeats: int) -> tuple[float, float]:
    """Best times of a sum over n fp32 values and of a triad over three such arrays."""
    a, b, c = torch.ones(n), torch.ones(n), torch.ones(n)
    read_s = best_time_s(lambda: a.sum(), repeats)
    triad_s = best_time_s(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    return read_s, triad_s


def probe_machine(
    threads: int | None = None,
    *,
    buffer_bytes: int = 256 << 20,
    matmul_n: int = 1024,
    repeats: int = 10,  # best of 10: on a shared machine some runs lose their core
    save: bool = True,
) -> MachineLimits:
    """Measure read and triad bandwidth and peak matmul FLOP/s; cache them unless ``save`` is
    False. ``threads`` None uses torch's current thread count."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if buffer_bytes < 1 << 20 or matmul_n < 16 or repeats < 1:
        raise ConfigError("probe needs buffer_bytes >= 1 MiB, matmul_n >= 16 and repeats >= 1")
    load = machine_load()
    with _threads(threads) as n_threads, torch.inference_mode():
        n = buffer_bytes // 4
        read_s, triad_s = _bandwidth_times(n, repeats)
        peak: dict[str, float] = {}
        for name, dtype in _DTYPES.items():
            x = torch.randn(matmul_n, matmul_n).to(dtype)
            y = torch.randn(matmul_n, matmul_n).to(dtype)
            t = best_time_s(lambda x=x, y=y: torch.nn.functional.linear(x, y), repeats)
            peak[name] = 2 * matmul_n**3 / t
    limits = MachineLimits(
        cpu_model=cpu_model(),
        threads=n_threads,
        read_bw_bytes_s=n * 4 / read_s,
        triad_bw_bytes_s=3 * n * 4 / triad_s,
        peak_flops=peak,
        buffer_bytes=n * 4,
        matmul_n=matmul_n,
        repeats=repeats,
        torch=torch.__version__,
        probed_unix_s=time.time(),
        load=load.to_dict(),
    )
    if save:
        save_machine_limits(limits)
    return limits


def limits_path() -> Path:
    return cache_dir() / CACHE_FILE


def _read_cache() -> dict[str, Any]:
    path = limits_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": 1, "entries": {}}
    if not isinstance(data, dict) or data.get("version") != 1:
        return {"version": 1, "entries": {}}
    return data


def merge_limits(old: MachineLimits | None, new: MachineLimits) -> MachineLimits:
    """What the cache keeps when ``new`` is probed over ``old`` (same CPU and threads): ``new``
    unless it is busy; a busy probe keeps a quiet ``old`` (from the same torch), and merges with
    a busy one by the best of each rate."""
    if old is None or not new.busy or old.torch != new.torch:
        return new
    if not old.busy:
        return old
    peak = {k: max(v, old.peak_flops.get(k, 0.0)) for k, v in new.peak_flops.items()}
    return dataclasses.replace(
        new,
        read_bw_bytes_s=max(new.read_bw_bytes_s, old.read_bw_bytes_s),
        triad_bw_bytes_s=max(new.triad_bw_bytes_s, old.triad_bw_bytes_s),
        peak_flops=peak,
        probes=old.probes + 1,
    )


def save_machine_limits(limits: MachineLimits) -> Path:
    """Store ``limits`` in the cache file (atomic replace), keyed by CPU model and threads, merged
    with the cached entry by :func:`merge_limits`."""
    data = _read_cache()
    entries = data.setdefault("entries", {})
    old = entries.get(limits.key)
    try:
        cached = MachineLimits.from_dict(old) if old else None
    except TypeError:  # an entry of another layout: replaced
        cached = None
    entries[limits.key] = merge_limits(cached, limits).to_dict()
    path = limits_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=2)
    return path


def load_machine_limits(
    threads: int | None = None, *, accept_busy: bool = False
) -> MachineLimits | None:
    """The cached limits of this CPU for ``threads`` (None: torch's current count), or None when
    ``joules bench --probe`` has not measured them yet, or when they were probed on a busy
    machine fewer than ``MAX_BUSY_PROBES`` times (probe again; ``accept_busy`` takes them)."""
    n = threads if threads is not None else torch.get_num_threads()
    entry = _read_cache().get("entries", {}).get(f"{cpu_model()}|{n}")
    if not entry:
        return None
    try:
        limits = MachineLimits.from_dict(entry)
    except TypeError:
        return None
    if limits.busy and limits.probes < MAX_BUSY_PROBES and not accept_busy:
        return None
    return limits
