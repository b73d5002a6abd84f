"""A scripted energy backend and clock, so every meter code path runs in CPU-only CI.

    >>> from joules.measure import Meter
    >>> from joules.testing.measure import FakeBackend, FakeClock
    >>> clock = FakeClock()
    >>> fake = FakeBackend({"gpu0": 300.0, "package0": 50.0}, clock=clock)
    >>> meter = Meter([fake], clock=clock, interval_s=None)
    >>> w = meter.begin("prefill"); clock.advance(1.0); fake.set_power("gpu0", 100.0)
    >>> clock.advance(1.0); meter.end(w).energy_j_by_domain
    {'gpu0': 400.0, 'package0': 100.0}

Power changes take effect at the clock's current time, so the energy is exact: the integral of a
piecewise-constant power.
"""

from __future__ import annotations

from joules.measure.base import Backend, DomainInfo, Reading


class FakeClock:
    """A monotonic clock that moves only when told to (``advance``)."""

    def __init__(self, t_s: float = 1000.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s

    def advance(self, dt_s: float) -> None:
        if dt_s < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.t_s += dt_s


class FakeBackend(Backend):
    """Domains drawing a scripted piecewise-constant power; counter semantics by default."""

    name = "fake"

    def __init__(
        self,
        power_w: dict[str, float],
        *,
        clock: FakeClock,
        method: str = "counter",
        relative_uncertainty: float = 0.05,
        idle_w: dict[str, float] | None = None,
        embodied_g_per_h: float = 0.0,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.method = method
        self.relative_uncertainty = relative_uncertainty
        self._power = dict(power_w)
        self._energy = dict.fromkeys(power_w, 0.0)
        self._t = clock()
        self._idle = idle_w
        self._embodied = embodied_g_per_h
        self.reads = 0

    def _advance_to(self, t_s: float) -> None:
        dt = t_s - self._t
        if dt > 0:
            for k, p in self._power.items():
                self._energy[k] += p * dt
            self._t = t_s

    def set_power(self, domain: str, power_w: float) -> None:
        """Change one domain's power from the clock's current time on."""
        self._advance_to(self.clock())
        self._power[domain] = power_w

    def domains(self) -> list[DomainInfo]:
        return [
            DomainInfo(k, self.name, self.method, f"fake {k}", embodied_g_per_h=self._embodied)
            for k in self._power
        ]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        self.reads += 1
        self._advance_to(t_s)
        return Reading(t_s, dict(self._energy))

    def model_idle_power_w(self) -> dict[str, float] | None:
        return dict(self._idle) if self._idle is not None else None


class FakeNvmlError(Exception):
    """Stand-in for ``pynvml.NVMLError`` (carries the NVML error code in ``value``)."""

    def __init__(self, value: int, msg: str = "") -> None:
        super().__init__(msg or f"NVML error {value}")
        self.value = value


class FakeGpu:
    """One scripted GPU: power (W), an energy counter (J) or None when unsupported."""

    def __init__(
        self,
        name: str = "NVIDIA H100 80GB HBM3",
        power_w: float = 300.0,
        counter: bool = True,
        counter_start_j: float = 5_000.0,
        power_limit_w: float = 700.0,
        limit_range_w: tuple[float, float] = (200.0, 700.0),
    ) -> None:
        self.name = name
        self.power_w = power_w
        self.counter = counter
        self.energy_j = counter_start_j
        self.power_limit_w = power_limit_w
        self.limit_range_w = limit_range_w
        self.counter_frozen = False  # a counter that stops updating (short windows, old boards)


class FakeNvml:
    """A pynvml-like module over scripted GPUs and a FakeClock; energy accrues as time passes.

    Only the calls joules makes exist. ``root=False`` makes power-limit changes fail with
    NVML_ERROR_NO_PERMISSION, as they do for non-root users.
    """

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVMLError = FakeNvmlError

    def __init__(self, gpus: list[FakeGpu], clock: FakeClock, root: bool = True) -> None:
        self.gpus = gpus
        self.clock = clock
        self.root = root
        self._t = clock()
        self.shutdowns = 0

    def _tick(self) -> None:
        dt = self.clock() - self._t
        if dt > 0:
            for g in self.gpus:
                if not g.counter_frozen:
                    g.energy_j += g.power_w * dt
            self._t = self.clock()

    def set_power(self, i: int, power_w: float) -> None:
        """Change GPU ``i``'s power from the clock's current time on (energy so far is kept)."""
        self._tick()
        self.gpus[i].power_w = power_w

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return h.name

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        self._tick()
        if not h.counter:
            raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED, "Not Supported")
        return round(h.energy_j * 1e3)  # millijoules, as NVML returns them

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._tick()
        return round(h.power_w * 1e3)  # milliwatts

    def nvmlDeviceGetPowerManagementLimit(self, h: FakeGpu) -> int:
        return round(h.power_limit_w * 1e3)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: FakeGpu) -> tuple[int, int]:
        return int(h.limit_range_w[0] * 1e3), int(h.limit_range_w[1] * 1e3)

    def nvmlDeviceSetPowerManagementLimit(self, h: FakeGpu, mw: int) -> None:
        if not self.root:
            raise FakeNvmlError(self.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions")
        h.power_limit_w = mw / 1e3


class FakeAmdSmi:
    """An amdsmi-like module over scripted GPUs (FakeGpu) and a FakeClock."""

    RESOLUTION_UJ = 15.3  # microjoules per accumulator tick, as on MI200/MI300

    def __init__(self, gpus: list[FakeGpu], clock: FakeClock) -> None:
        self.nvml = FakeNvml(gpus, clock)  # reuse its energy bookkeeping

    def amdsmi_init(self) -> None:
        pass

    def amdsmi_shut_down(self) -> None:
        pass

    def amdsmi_get_processor_handles(self) -> list[FakeGpu]:
        return list(self.nvml.gpus)

    def amdsmi_get_gpu_asic_info(self, h: FakeGpu) -> dict[str, str]:
        return {"market_name": h.name}

    def amdsmi_get_energy_count(self, h: FakeGpu) -> dict[str, float]:
        self.nvml._tick()
        if not h.counter:
            raise RuntimeError("AMDSMI_STATUS_NOT_SUPPORTED")
        ticks = int(h.energy_j * 1e6 / self.RESOLUTION_UJ)
        return {"energy_accumulator": ticks, "counter_resolution": self.RESOLUTION_UJ}

    def amdsmi_get_power_info(self, h: FakeGpu) -> dict[str, float | str]:
        self.nvml._tick()
        return {"current_socket_power": h.power_w, "average_socket_power": "N/A"}
