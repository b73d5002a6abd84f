"""Energy measurement: NVML, RAPL and AMD counters, an honest estimator, baselines and carbon.

    >>> from joules.measure import detect_meter
    >>> meter = detect_meter()                 # every GPU, CPU package and DRAM domain found
    >>> with meter.window("generate") as w:
    ...     _ = sum(range(100_000))
    >>> m = w.measurement                      # energy_j, method, uncertainty_j, net_energy_j, co2_g
    >>> m.method in ("counter", "sampled", "estimated")
    True
    >>> meter.close()

Also ``meter.begin(name)`` / ``meter.end(name)``, ``@meter.measure``, nested and overlapping
windows, ``measure_repeated(fn, repeats)`` (mean, std, 95 % t interval), ``joules idle``
baselines (``idle.py``), carbon and water (``carbon.py``), GPU power limits (``power.py``).
Backends: ``nvml.py``, ``rapl.py``, ``amd.py``, ``estimate.py``, ``fake.py``.
"""

from __future__ import annotations

from joules.measure.base import (
    METHODS,
    Backend,
    DomainEnergy,
    DomainInfo,
    Measurement,
    Meter,
    PowerTimeline,
    Reading,
    Window,
)
from joules.measure.carbon import CarbonConfig, CarbonResult, GridIntensity, grid_intensity
from joules.measure.detect import detect_backends, detect_meter, meter_domains
from joules.measure.stats import RepeatedMeasurement, Summary, measure_repeated, summarize

__all__ = [
    "METHODS",
    "Backend",
    "CarbonConfig",
    "CarbonResult",
    "DomainEnergy",
    "DomainInfo",
    "GridIntensity",
    "Measurement",
    "Meter",
    "PowerTimeline",
    "Reading",
    "RepeatedMeasurement",
    "Summary",
    "Window",
    "detect_backends",
    "detect_meter",
    "grid_intensity",
    "measure_repeated",
    "meter_domains",
    "summarize",
]
