"""NVIDIA GPU energy through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

    >>> from joules.measure.nvml import NvmlBackend
    >>> nvml = NvmlBackend()                          # doctest: +SKIP
    >>> [(d.name, d.method) for d in nvml.domains()]   # doctest: +SKIP
    [('gpu0', 'counter'), ('gpu1', 'counter')]

Per GPU: the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since
the driver loaded; Volta and later) where it works, else ``nvmlDeviceGetPowerUsage`` (milliwatts)
sampled by the meter's 10 Hz thread and integrated (method ``sampled``). The rules for short
windows, counters reading 0 and counters going backwards are in ``_gpu.py``. Note that on
Ampere and later boards ``nvmlDeviceGetPowerUsage`` is itself a 1 s moving average, so sampled
energy smooths spikes shorter than a second.

Uncertainty: NVIDIA documents board power readings as accurate to ±5 W (``nvidia-smi -q``
"Power Draw"); we report max(±5 W x duration, ±5 %) for counter and sampled alike (both come
from the same sensor), plus the trapezoid's discretisation bound for sampled energy.

The library object is injectable (``lib=``) so tests drive a fake with the same functions.
"""

from __future__ import annotations

import contextlib
from typing import Any

from joules.errors import ConfigError, MeterError
from joules.measure._gpu import CounterUnavailable, GpuBackend

_ROOT_FIX = "setting GPU power limits needs root: run with sudo (or `sudo nvidia-smi -pl W`)"


def load_pynvml() -> Any:
    """Import and initialise pynvml, or raise MeterError saying why NVML is unavailable."""
    try:
        import pynvml
    except ImportError as exc:
        raise MeterError("nvidia-ml-py is not installed: pip install nvidia-ml-py") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on CPU machines
        raise MeterError(f"NVML unavailable ({exc}): no NVIDIA driver on this machine") from exc
    return pynvml


def _err_value(lib: Any, exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


class NvmlBackend(GpuBackend):
    """One domain per NVIDIA GPU (``gpu0``, ``gpu1``...), counter or sampled."""

    name = "nvml"
    sensor_accuracy_w = 5.0

    def __init__(
        self,
        indices: list[int] | None = None,
        *,
        lib: Any = None,
        counter_period_s: float | None = None,
    ) -> None:
        self.lib = lib if lib is not None else load_pynvml()
        self._handles: dict[int, Any] = {}
        super().__init__(indices, counter_period_s)

    def _handle(self, i: int) -> Any:
        if i not in self._handles:
            self._handles[i] = self.lib.nvmlDeviceGetHandleByIndex(i)
        return self._handles[i]

    def _count(self) -> int:
        return int(self.lib.nvmlDeviceGetCount())

    def _device_name(self, i: int) -> str:
        name = self.lib.nvmlDeviceGetName(self._handle(i))
        return name.decode() if isinstance(name, bytes) else str(name)

    def _counter_j(self, i: int) -> float:
        try:
            return self.lib.nvmlDeviceGetTotalEnergyConsumption(self._handle(i)) / 1e3
        except self.lib.NVMLError as exc:
            raise CounterUnavailable(str(exc) or "NVML error") from exc

    def _power_w(self, i: int) -> float:
        try:
            return self.lib.nvmlDeviceGetPowerUsage(self._handle(i)) / 1e3
        except self.lib.NVMLError as exc:
            raise MeterError(f"gpu{i}: NVML cannot read power ({exc})") from exc

    # -- power limits (POLCA / Zeus): see joules.measure.power for the helpers -----------------
    def power_limit_w(self, i: int) -> float:
        """The current power limit of GPU ``i`` (W)."""
        return self.lib.nvmlDeviceGetPowerManagementLimit(self._handle(i)) / 1e3

    def power_limit_range_w(self, i: int) -> tuple[float, float]:
        """(min, max) power limit GPU ``i`` accepts (W)."""
        lo, hi = self.lib.nvmlDeviceGetPowerManagementLimitConstraints(self._handle(i))
        return lo / 1e3, hi / 1e3

    def set_power_limit_w(self, i: int, watts: float) -> None:
        """Set GPU ``i``'s power limit; needs root. Out-of-range values are a ConfigError."""
        lo, hi = self.power_limit_range_w(i)
        if not lo <= watts <= hi:
            raise ConfigError(
                f"gpu{i} power limit {watts:g} W is outside what it accepts: {lo:g}-{hi:g} W"
            )
        try:
            self.lib.nvmlDeviceSetPowerManagementLimit(self._handle(i), round(watts * 1e3))
        except self.lib.NVMLError as exc:
            if _err_value(self.lib, exc) == getattr(self.lib, "NVML_ERROR_NO_PERMISSION", 4):
                raise MeterError(f"gpu{i}: {_ROOT_FIX}") from exc
            raise MeterError(f"gpu{i}: NVML refused power limit {watts:g} W ({exc})") from exc

    def close(self) -> None:
        # Shutting down a library that already failed is not worth an error.
        with contextlib.suppress(Exception):
            self.lib.nvmlShutdown()
