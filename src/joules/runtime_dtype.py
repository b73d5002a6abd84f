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
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from joules.errors import ConfigError

try:
    from joules.system import cpu_flags
except ImportError:  # pragma: no cover - until joules.system.cpu_flags lands on main
    _ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve")

    def cpu_flags() -> list[str]:
        path = Path("/proc/cpuinfo")
        text = path.read_text(errors="replace") if path.is_file() else ""
        found = set()
        for line in text.splitlines():
            if line.lower().startswith(("flags", "features")):
                found |= set(line.split(":", 1)[1].split())
        return [f for f in _ISA if f in found]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHOICES = ("auto", *DTYPES)
MARGIN = 1.10  # bf16 must beat fp32 by 10 % to be picked: a tie is not worth its rounding
_PROBE_SHAPE = (512, 576, 1536)  # rows x in -> out: SmolLM2-135M's MLP up-projection


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype picked and why (``reason`` is printed by the CLI and stored in results)."""

    name: str  # "fp32" or "bf16"
    requested: str  # "auto", "fp32" or "bf16"
    reason: str
    fp32_s: float | None = None  # probe: seconds per matmul
    bf16_s: float | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _cache_dir() -> Path:
    from joules.models.loading import cache_dir

    return cache_dir() / "dtype_probe"


def probe_key() -> str:
    """What the probe's verdict depends on: CPU model and flags, torch version, threads."""
    from joules.system import cpu_model

    text = "|".join(
        [cpu_model(), ",".join(cpu_flags()), torch.__version__, str(torch.get_num_threads())]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _time_matmul(dtype: torch.dtype, repeats: int) -> float:
    rows, din, dout = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, din, generator=gen).to(dtype)
    w = torch.randn(dout, din, generator=gen).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)  # warm-up (first-call dispatch, allocations)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return best


def probe(repeats: int = 7) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of one probe matmul in fp32 and in bf16."""
    return _time_matmul(torch.float32, repeats), _time_matmul(torch.bfloat16, repeats)


def auto_dtype(refresh: bool = False) -> DtypeChoice:
    """bf16 if the cached (or a fresh) probe finds it ``MARGIN`` times faster than fp32, else fp32."""
    path = _cache_dir() / f"{probe_key()}.json"
    cached = None
    if path.is_file() and not refresh:
        try:
            cached = json.loads(path.read_text())
            fp32_s, bf16_s = float(cached["fp32_s"]), float(cached["bf16_s"])
        except (OSError, ValueError, KeyError, TypeError):
            cached = None
    if cached is None:
        fp32_s, bf16_s = probe()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({"fp32_s": fp32_s, "bf16_s": bf16_s, "torch": torch.__version__})
            )
        except OSError:  # a read-only cache only costs a probe per run
            pass
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    name = "bf16" if speedup >= MARGIN else "fp32"
    reason = (
        f"auto: bf16 matmul is {speedup:.2f}x fp32 on this CPU "
        f"({'probed' if cached is None else 'cached probe'}; bf16 needs >= {MARGIN:.2f}x)"
    )
    return DtypeChoice(name, "auto", reason, fp32_s, bf16_s)


def resolve_dtype(requested: str) -> DtypeChoice:
    """``fp32`` / ``bf16`` as asked, or ``auto`` (see :func:`auto_dtype`)."""
    if requested == "auto":
        return auto_dtype()
    if requested not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(CHOICES)}, got {requested!r}")
    return DtypeChoice(requested, requested, "requested")


__all__ = ["CHOICES", "DTYPES", "DtypeChoice", "auto_dtype", "probe", "probe_key", "resolve_dtype"]
