"""Find every energy domain this machine exposes and build one Meter over all of them.

    >>> from joules.measure import detect_meter
    >>> meter = detect_meter()
    >>> sorted({d.method for d in meter.domains()}) in (["estimated"], ["counter"],
    ...     ["counter", "estimated"], ["counter", "sampled"], ["sampled"])
    True

Order: NVIDIA GPUs (NVML), AMD GPUs (amdsmi, if installed), CPU packages and DRAM (RAPL). Where
RAPL cannot be read, CPU and memory energy are estimated from CPU time (``estimate.py``), and the
reason RAPL was not used is kept in ``meter.notes`` and printed by ``joules doctor``: the meter
never falls back to a guess silently. Where RAPL has no DRAM domain (most client CPUs), memory
is estimated beside the counted packages.

``scope`` only affects the estimator ("process": this process and its children; "children":
only the children; "system": the whole machine). Counters always meter whole devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joules.errors import MeterError
from joules.measure.amd import AmdSmiBackend
from joules.measure.base import Backend, DomainInfo, Meter, Reading
from joules.measure.estimate import EstimateBackend
from joules.measure.nvml import NvmlBackend
from joules.measure.rapl import RaplBackend


class _EstimatedDram(Backend):
    """Only the estimator's ``dram`` domain (beside RAPL packages that have no DRAM zone)."""

    name = "estimate"
    relative_uncertainty = 0.30

    def __init__(self, est: Any) -> None:
        super().__init__()
        self.est = est

    def domains(self) -> list[DomainInfo]:
        return [d for d in self.est.domains() if d.name == "dram"]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        r = self.est.read(t_s, precise=precise)
        return Reading(t_s, {"dram": r.energy_j["dram"]})

    def model_idle_power_w(self) -> dict[str, float]:
        return {"dram": 0.0}

    def idle_key(self) -> str | None:
        return None  # modelled, like the estimator's


def detect_backends(
    *,
    scope: str = "process",
    cpu_tdp_w: float | None = None,
    gpus: bool = True,
    nvml_lib: Any = None,
    amdsmi_lib: Any = None,
    powercap_root: str | Path | None = None,
    cpu: str = "auto",
) -> tuple[list[Backend], list[str]]:
    """The backends available here and notes on those that were not (with why).

    ``cpu``: "auto" (RAPL, else estimate), "rapl" (RAPL or an error), "estimate", or "none".
    """
    backends: list[Backend] = []
    notes: list[str] = []
    if gpus:
        try:
            backends.append(NvmlBackend(lib=nvml_lib))
        except MeterError as exc:
            notes.append(f"nvml: {exc}")
        try:
            backends.append(AmdSmiBackend(lib=amdsmi_lib))
        except MeterError as exc:
            if amdsmi_lib is not None or "not installed" not in str(exc):
                notes.append(f"amd: {exc}")
    if cpu == "none":
        return backends, notes
    rapl = None
    if cpu in ("auto", "rapl"):
        try:
            rapl = RaplBackend(powercap_root)
        except MeterError as exc:
            if cpu == "rapl":
                raise
            notes.append(f"rapl: {exc}")
    if rapl is not None:
        backends.append(rapl)
        if not any(z.kind == "dram" for z in rapl.zones):
            backends.append(_EstimatedDram(EstimateBackend(scope, cpu_tdp_w=cpu_tdp_w)))
    else:
        backends.append(EstimateBackend(scope, cpu_tdp_w=cpu_tdp_w))
    return backends, notes


def detect_meter(
    *,
    scope: str = "process",
    cpu_tdp_w: float | None = None,
    interval_s: float | None = 0.1,
    timeline: bool = False,
    carbon: Any = None,
    idle_power_w: dict[str, float] | str | None = "auto",
    gpus: bool = True,
    cpu: str = "auto",
    nvml_lib: Any = None,
    amdsmi_lib: Any = None,
    powercap_root: str | Path | None = None,
) -> Meter:
    """A Meter over every GPU, CPU package and DRAM domain found (see the module docstring)."""
    backends, notes = detect_backends(
        scope=scope,
        cpu_tdp_w=cpu_tdp_w,
        gpus=gpus,
        nvml_lib=nvml_lib,
        amdsmi_lib=amdsmi_lib,
        powercap_root=powercap_root,
        cpu=cpu,
    )
    return Meter(
        backends,
        interval_s=interval_s,
        timeline=timeline,
        carbon=carbon,
        idle_power_w=idle_power_w,
        notes=notes,
    )


def meter_domains(**kwargs: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """What ``joules doctor`` prints: one dict per domain (domain, backend, method, device,
    note) and the notes on backends that are unavailable."""
    meter = detect_meter(interval_s=None, idle_power_w=None, **kwargs)
    try:
        return meter.describe(), list(meter.notes)
    finally:
        meter.close()
