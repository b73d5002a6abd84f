"""Repeated measurements: mean, standard deviation and a 95 % confidence interval (Student t).

    >>> from joules.measure.stats import summarize
    >>> s = summarize([10.0, 12.0, 11.0, 13.0])
    >>> round(s.mean, 2), round(s.ci95_low, 2), round(s.ci95_high, 2)
    (11.5, 9.45, 13.55)

``measure_repeated(fn, repeats)`` runs ``fn`` ``warmup`` times unmeasured, then ``repeats`` times
each in its own meter window, and summarizes energy, duration, power and net energy. The interval
is mean ± t(0.975, n-1) x s / sqrt(n): it covers run-to-run noise, not the meter's own systematic
uncertainty, which each Measurement reports separately as ``uncertainty_j``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joules.errors import ConfigError
from joules.measure.base import Measurement
from joules.measure.detect import detect_meter

# Two-sided 95 % quantiles of Student's t, t(0.975, df), for df = 1..30 (standard tables).
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip
_T975_LARGE = [(40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960)]


def t_quantile_975(df: int) -> float:
    """t(0.975, df): exact table values to df 30, then interpolated linearly in 1/df."""
    if df < 1:
        raise ConfigError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    if df <= 30:
        return _T975[df - 1]
    lo_df, lo_t = 30, _T975[-1]
    for hi_df, hi_t in _T975_LARGE:
        if df <= hi_df:
            x = (1 / lo_df - 1 / df) / (1 / lo_df - (0 if math.isinf(hi_df) else 1 / hi_df))
            return lo_t + x * (hi_t - lo_t)
        lo_df, lo_t = hi_df, hi_t
    return 1.960


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and 95 % t interval of n values."""

    n: int
    mean: float
    std: float
    ci95_low: float
    ci95_high: float

    @property
    def ci95_half_width(self) -> float:
        return (self.ci95_high - self.ci95_low) / 2

    def to_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci95_low": self.ci95_low,
            "ci95_high": self.ci95_high,
        }


def summarize(values: list[float]) -> Summary:
    """Summary of ``values``; one value gives a zero-width interval and std 0 (said by n=1)."""
    n = len(values)
    if n == 0:
        raise ConfigError("nothing to summarize: need at least one value")
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, 0.0, mean, mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass
class RepeatedMeasurement:
    """``repeats`` measurements of one function and their summaries."""

    name: str
    measurements: list[Measurement]
    energy_j: Summary
    duration_s: Summary
    avg_power_w: Summary
    net_energy_j: Summary | None
    method: str
    results: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "energy_j": self.energy_j.to_dict(),
            "duration_s": self.duration_s.to_dict(),
            "avg_power_w": self.avg_power_w.to_dict(),
            "net_energy_j": self.net_energy_j.to_dict() if self.net_energy_j else None,
            "measurements": [m.to_dict() for m in self.measurements],
        }


def measure_repeated(
    fn: Callable[[], Any],
    repeats: int = 5,
    *,
    meter: Any = None,
    warmup: int = 1,
    name: str | None = None,
) -> RepeatedMeasurement:
    """Run ``fn`` ``warmup`` + ``repeats`` times; measure the last ``repeats`` (default meter:
    :func:`joules.measure.detect_meter`)."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    own = meter is None
    if own:
        meter = detect_meter()
    label = name or getattr(fn, "__name__", "run")
    try:
        for _ in range(warmup):
            fn()
        ms, results = [], []
        for i in range(repeats):
            with meter.window(f"{label}[{i}]") as w:
                results.append(fn())
            ms.append(w.measurement)
    finally:
        if own:
            meter.close()
    nets = [m.net_energy_j for m in ms]
    methods = {m.method for m in ms}
    return RepeatedMeasurement(
        name=label,
        measurements=ms,
        energy_j=summarize([m.energy_j for m in ms]),
        duration_s=summarize([m.duration_s for m in ms]),
        avg_power_w=summarize([m.avg_power_w for m in ms]),
        net_energy_j=None if any(v is None for v in nets) else summarize(nets),  # type: ignore[arg-type]
        method=max(methods, key=("counter", "sampled", "estimated").index),
        results=results,
    )
