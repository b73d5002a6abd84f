"""Pick the compute dtype for speed-bound work: bf16 only where it is faster on this CPU.

    >>> from joules.runtime_dtype import resolve_dtype
    >>> resolve_dtype("fp32").name, resolve_dtype("bf16").name
    ('fp32', 'bf16')
    >>> resolve_dtype("auto").name in {"fp32", "bf16"}                  # doctest: +SKIP
    True

bf16 matmul is fast on CPUs with native bf16 instructions (AVX512-BF16, AMX, ARM's BF16) and
slow where PyTorch must emulate it: on a 2-vCPU AVX2-only AMD EPYC, bf16 perplexity ran about 6x
slower than fp32. ``auto`` therefore runs a one-time probe -- a matmul of the shape a small
LM's linear layers have (512 rows x 576 -> 1,536), timed in fp32 and in bf16 -- and picks bf16
only if it is at least ``MARGIN`` times faster. The verdict is cached as JSON under
``$JOULES_CACHE_DIR/dtype_probe/`` keyed by the CPU model, its ISA flags, the torch version and
the thread count, so later runs on the same machine do not probe again.

A speed probe run beside other jobs can be off several times over, so every speed probe in joules
(this one, the kernels' activation dtype in :mod:`joules.compress.modules.kernels`, ``joules bench
--probe``) keeps the *best* time over its repeats (a competing job only ever adds time) and
records the machine's load with its verdict (:func:`machine_load`). A verdict taken while the
machine was busy is not kept as the machine's truth: the next run probes again and keeps, per
dtype, the best time seen so far, until a quiet probe replaces it or ``MAX_BUSY_PROBES`` busy
probes have been merged (then the verdict is used, and still says it was busy).

Quality figures never depend on this probe: ``joules eval`` computes in fp32 unless ``--dtype``
asks otherwise, and records what it ran (see :mod:`joules.evaluate.scoring`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from joules import dtypes
from joules.errors import ConfigError
from joules.paths import cache_dir
from joules.serialize import atomic_write_json
from joules.system import cpu_flags, cpu_model

DTYPES = dtypes.choices("fp32", "bf16")
CHOICES = ("auto", *DTYPES)
MARGIN = 1.10  # bf16 must beat fp32 by 10 % to be picked: a tie is not worth its rounding
_PROBE_SHAPE = (512, 576, 1536)  # rows x in -> out: SmolLM2-135M's MLP up-projection
# A probe is trusted when other processes kept at most this many runnable threads per core over
# the last minute. Above it, a probe that uses every core shares each one with more than half a
# thread on average, so a third or more of its time can go to other jobs, well beyond MARGIN's
# 10 %; below it, the best of several repeats usually finds a slot with the core to itself.
BUSY_LOAD_PER_CORE = 0.5
MAX_BUSY_PROBES = 3  # busy probes merged (best time per dtype) before their verdict is used


@dataclass(frozen=True)
class MachineLoad:
    """The 1-minute load average when a probe ran, and the part this process put there.

    ``own_1m`` estimates this process's contribution to the load average from its CPU time
    (its mean CPU use since it started, through the load average's 1-minute exponential
    decay), so a probe right after this process's own work does not count that work as a
    competing job.
    """

    load_1m: float
    own_1m: float
    cores: int

    @property
    def others_per_core(self) -> float:
        return max(0.0, self.load_1m - self.own_1m) / max(1, self.cores)

    @property
    def busy(self) -> bool:
        return self.others_per_core > BUSY_LOAD_PER_CORE

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "busy": self.busy}


def machine_load() -> MachineLoad:
    """This machine's load now (``os.getloadavg()``; 0 where the OS has none, e.g. Windows)."""
    try:
        load_1m = os.getloadavg()[0]
    except (AttributeError, OSError):
        load_1m = 0.0
    own = 0.0
    try:
        proc = psutil.Process()
        t = proc.cpu_times()
        age_s = max(1e-3, time.time() - proc.create_time())
        own = (t.user + t.system) / age_s * (1.0 - math.exp(-age_s / 60.0))
    except (psutil.Error, OSError):
        pass
    return MachineLoad(load_1m, own, os.cpu_count() or 1)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype picked and why (``reason`` is printed by the CLI and stored in results)."""

    name: str  # "fp32" or "bf16"
    requested: str  # "auto", "fp32" or "bf16"
    reason: str
    fp32_s: float | None = None  # probe: best seconds per matmul
    bf16_s: float | None = None
    load: dict[str, object] | None = None  # MachineLoad.to_dict() of the probe(s) it came from

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _probe_dir() -> Path:
    return cache_dir() / "dtype_probe"


def probe_key() -> str:
    """What the probe's verdict depends on: CPU model and flags, torch version, threads."""
    text = "|".join(
        [cpu_model(), ",".join(cpu_flags()), torch.__version__, str(torch.get_num_threads())]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def best_time_s(fn: Callable[[], object], repeats: int) -> float:
    """Best seconds of ``repeats`` calls of ``fn`` after one warm-up call (first-call dispatch,
    allocations, page touches): other jobs only ever add time, so the minimum is the probe.
    Every speed probe (``--dtype auto``, the kernels' activation dtype, ``bench --probe``)
    times through this."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _time_matmul(dtype: torch.dtype, repeats: int) -> float:
    rows, din, dout = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, din, generator=gen).to(dtype)
    w = torch.randn(dout, din, generator=gen).to(dtype)
    with torch.inference_mode():
        return best_time_s(lambda: torch.nn.functional.linear(x, w), repeats)


def probe(repeats: int = 7) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of one probe matmul in fp32 and in bf16."""
    return _time_matmul(torch.float32, repeats), _time_matmul(torch.bfloat16, repeats)


def _read_probe(path: Path) -> dict[str, object] | None:
    """A cached probe, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
        float(cached["fp32_s"]), float(cached["bf16_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cached if isinstance(cached, dict) else None


def _trusted(cached: dict[str, object]) -> bool:
    """A cached probe is the machine's truth when it was quiet (or busy probes ran out)."""
    load = cached.get("load")
    if not isinstance(load, dict) or "busy" not in load:
        return False  # cached before loads were recorded: probe once more
    return not load["busy"] or int(cached.get("probes", 1)) >= MAX_BUSY_PROBES


def auto_dtype(refresh: bool = False) -> DtypeChoice:
    """bf16 if the cached (or a fresh) probe finds it ``MARGIN`` times faster than fp32, else fp32.

    A cached probe taken on a busy machine is probed again (see the module docstring).
    """
    path = _probe_dir() / f"{probe_key()}.json"
    cached = None if refresh else _read_probe(path)
    if cached is not None and _trusted(cached):
        fp32_s, bf16_s = float(cached["fp32_s"]), float(cached["bf16_s"])
        load, how = cached["load"], "cached probe"
    else:
        load_now = machine_load()
        fp32_s, bf16_s = probe()
        probes = 1
        how = "probed"
        if cached is not None and load_now.busy:  # busy again: keep the best time of each
            fp32_s = min(fp32_s, float(cached["fp32_s"]))
            bf16_s = min(bf16_s, float(cached["bf16_s"]))
            probes = int(cached.get("probes", 1)) + 1
            how = f"best of {probes} busy probes"
        load = load_now.to_dict()
        entry = {
            "fp32_s": fp32_s,
            "bf16_s": bf16_s,
            "torch": torch.__version__,
            "load": load,
            "probes": probes,
            "probed_unix_s": time.time(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, entry, indent=None)
        except OSError:  # a read-only cache only costs a probe per run
            pass
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    name = "bf16" if speedup >= MARGIN else "fp32"
    busy = " on a busy machine" if load.get("busy") else ""
    reason = (
        f"auto: bf16 matmul is {speedup:.2f}x fp32 on this CPU "
        f"({how}{busy}; bf16 needs >= {MARGIN:.2f}x)"
    )
    return DtypeChoice(name, "auto", reason, fp32_s, bf16_s, dict(load))


def resolve_dtype(requested: str) -> DtypeChoice:
    """``fp32`` / ``bf16`` as asked, or ``auto`` (see :func:`auto_dtype`)."""
    if requested == "auto":
        return auto_dtype()
    if requested not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(CHOICES)}, got {requested!r}")
    return DtypeChoice(requested, requested, "requested")


__all__ = [
    "BUSY_LOAD_PER_CORE",
    "CHOICES",
    "DTYPES",
    "MAX_BUSY_PROBES",
    "DtypeChoice",
    "MachineLoad",
    "auto_dtype",
    "machine_load",
    "probe",
    "probe_key",
    "resolve_dtype",
]
