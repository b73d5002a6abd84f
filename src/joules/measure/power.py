"""GPU power limits (the POLCA / Zeus lever): set them for a run, or sweep them.

    >>> from joules.measure import detect_meter
    >>> from joules.measure.power import gpu_power_limit, power_limit_sweep
    >>> meter = detect_meter()                                       # doctest: +SKIP
    >>> with gpu_power_limit(meter, 250.0):                          # doctest: +SKIP
    ...     run()
    >>> points = power_limit_sweep(run, [200, 250, 300], meter)      # doctest: +SKIP
    >>> [(p.limit_w, p.measurement.energy_j) for p in points]        # doctest: +SKIP

Setting a limit needs root (a one-line error says so otherwise); the original limits are
restored when the block ends, even on an exception. The meter must include NVML GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from joules.errors import ConfigError
from joules.measure.base import Measurement, Meter
from joules.measure.nvml import NvmlBackend


def nvml_backend(meter: Meter) -> NvmlBackend:
    """The meter's NVML backend, or a ConfigError saying power limits need an NVIDIA GPU."""
    for b in meter.backends:
        if isinstance(b, NvmlBackend):
            return b
    raise ConfigError("GPU power limits need an NVIDIA GPU read through NVML: none was detected")


@contextmanager
def gpu_power_limit(
    meter: Meter, watts: float, gpus: list[int] | None = None
) -> Iterator[dict[int, float]]:
    """Set ``watts`` on ``gpus`` (default: every metered GPU) for the block; yields the original
    limits and restores them afterwards."""
    nvml = nvml_backend(meter)
    indices = [g.index for g in nvml.gpus] if gpus is None else list(gpus)
    original = {i: nvml.power_limit_w(i) for i in indices}
    changed: list[int] = []
    try:
        for i in indices:
            nvml.set_power_limit_w(i, watts)
            changed.append(i)
        yield original
    finally:
        for i in changed:
            nvml.set_power_limit_w(i, original[i])


@dataclass
class PowerLimitPoint:
    """One point of a power-limit sweep."""

    limit_w: float
    measurement: Measurement
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"limit_w": self.limit_w, "measurement": self.measurement.to_dict()}


def power_limit_sweep(
    fn: Callable[[], Any],
    limits_w: list[float],
    meter: Meter,
    gpus: list[int] | None = None,
) -> list[PowerLimitPoint]:
    """Run ``fn`` once under each power limit, measured; limits restored afterwards."""
    if not limits_w:
        raise ConfigError("a power-limit sweep needs at least one limit in watts")
    points = []
    for watts in limits_w:
        with gpu_power_limit(meter, watts, gpus), meter.window(f"limit {watts:g} W") as w:
            result = fn()
        points.append(PowerLimitPoint(float(watts), w.measurement, result))  # type: ignore[arg-type]
    return points
