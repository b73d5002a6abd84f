"""AMD GPU energy through ``amdsmi`` (optional: ``pip install joules[amd]``; ROCm ships it).

    >>> from joules.measure.amd import AmdSmiBackend
    >>> amd = AmdSmiBackend()                          # doctest: +SKIP
    >>> [(d.name, d.method) for d in amd.domains()]     # doctest: +SKIP
    [('amdgpu0', 'counter')]

Same shape as NVML (the shared rules live in ``_gpu.py``): the energy accumulator from
``amdsmi_get_energy_count`` (ticks x ``counter_resolution`` microjoules) where it works, else
socket power from ``amdsmi_get_power_info`` sampled and integrated. amdsmi renamed the
accumulator key across releases (``power`` in ROCm 5.x/6.0, ``energy_accumulator`` later): both
are read. Uncertainty: ±5 % (AMD documents no sensor accuracy; this matches NVML's order).
Domains are ``amdgpu0``... so a machine with both vendors keeps distinct names.
"""

from __future__ import annotations

import contextlib
from typing import Any

from joules.errors import MeterError
from joules.measure._gpu import CounterUnavailable, GpuBackend


def load_amdsmi() -> Any:
    """Import and initialise amdsmi, or raise MeterError saying why it is unavailable."""
    try:
        import amdsmi  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MeterError("amdsmi is not installed: pip install 'joules[amd]' (needs ROCm)") from exc
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:
        raise MeterError(f"amdsmi unavailable ({exc}): no AMD GPU driver") from exc
    return amdsmi


class AmdSmiBackend(GpuBackend):
    """One domain per AMD GPU (``amdgpu0``...), counter or sampled."""

    name = "amd"
    domain_prefix = "amdgpu"

    def __init__(
        self, indices: list[int] | None = None, *, lib: Any = None, counter_period_s=None
    ) -> None:
        self.lib = lib if lib is not None else load_amdsmi()
        self._handles = list(self.lib.amdsmi_get_processor_handles())
        super().__init__(indices, counter_period_s)

    def _count(self) -> int:
        return len(self._handles)

    def _device_name(self, i: int) -> str:
        try:
            return str(self.lib.amdsmi_get_gpu_asic_info(self._handles[i])["market_name"])
        except Exception:
            return f"AMD GPU {i}"

    def _counter_j(self, i: int) -> float:
        try:
            info = self.lib.amdsmi_get_energy_count(self._handles[i])
        except Exception as exc:
            raise CounterUnavailable(str(exc) or "amdsmi error") from exc
        ticks = info.get("energy_accumulator", info.get("power"))
        if ticks is None or "counter_resolution" not in info:
            raise CounterUnavailable(f"unexpected amdsmi_get_energy_count fields {sorted(info)}")
        return float(ticks) * float(info["counter_resolution"]) * 1e-6

    def _power_w(self, i: int) -> float:
        try:
            info = self.lib.amdsmi_get_power_info(self._handles[i])
        except Exception as exc:
            raise MeterError(f"amdgpu{i}: amdsmi cannot read power ({exc})") from exc
        for key in ("current_socket_power", "average_socket_power"):
            value = info.get(key)
            if isinstance(value, int | float) and value >= 0:
                return float(value)
        raise MeterError(f"amdgpu{i}: amdsmi reports no socket power ({sorted(info)})")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lib.amdsmi_shut_down()
