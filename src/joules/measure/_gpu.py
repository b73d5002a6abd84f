"""What every GPU backend shares: an energy counter where the device has one, sampled power
integrated alongside it, and the rules for choosing between them per window.

Vendor files (``nvml.py``, ``amd.py``) only say how to count devices, name them, and read one
device's counter (joules) and power (watts). This module then:

- probes the counter once per GPU: unsupported, erroring or reading 0 (virtual GPUs, MIG
  slices, old boards) means that GPU is ``sampled`` for good, with a note saying why;
- on every read, polls power and integrates it with the trapezoid rule (the meter's thread reads
  at 10 Hz), so a sampled figure exists for every window, counter or not;
- per window, reports the counter difference, unless the window is shorter than the counter's
  update period or the counter did not move while power was drawn (then energy = power x time,
  labelled ``sampled`` with a note), or the counter went backwards during it (a reset: sampled).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from joules.errors import MeterError
from joules.measure.base import Backend, DomainEnergy, DomainInfo, Reading
from joules.measure.carbon import embodied_g_per_hour, match_device


class CounterUnavailable(Exception):
    """The device has no usable energy counter (the vendor call failed or is unsupported)."""


@dataclass
class _GpuState:
    index: int
    domain: str
    device: str
    use_counter: bool
    note: str | None = None
    counter_j: float = 0.0  # cumulative counter energy since start (positive steps only)
    last_raw_j: float | None = None
    epoch: int = 0  # bumped whenever the counter goes backwards
    sampled_j: float = 0.0  # cumulative trapezoid integral of polled power
    discretisation_j: float = 0.0  # cumulative |dP| dt / 2: the trapezoid's own error bound
    last_power_w: float | None = None
    last_t_s: float | None = None


class GpuBackend(Backend):
    """Base of the GPU backends; see the module docstring for the counter/sampled rules."""

    name = "gpu"
    domain_prefix = "gpu"
    #: how often the device's energy counter is refreshed; windows shorter than this are
    #: computed from power x time instead (NVML counters update about every 100 ms or faster)
    counter_period_s: float = 0.1
    #: absolute accuracy of the board's power sensor (W); None: use relative_uncertainty only
    sensor_accuracy_w: float | None = None

    def __init__(self, indices: list[int] | None = None, counter_period_s: float | None = None):
        super().__init__()
        if counter_period_s is not None:
            self.counter_period_s = counter_period_s
        n = self._count()
        if n == 0:
            raise MeterError(f"{self.name}: no GPU found")
        wanted = list(range(n)) if indices is None else list(indices)
        bad = [i for i in wanted if not 0 <= i < n]
        if bad:
            raise MeterError(f"{self.name}: no GPU {bad} (found {n}: 0..{n - 1})")
        self.gpus = [self._probe(i) for i in wanted]

    # -- vendor seam --------------------------------------------------------------------------
    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _device_name(self, i: int) -> str: ...

    @abstractmethod
    def _counter_j(self, i: int) -> float:
        """Cumulative energy counter of GPU ``i`` in joules; raise CounterUnavailable if none."""

    @abstractmethod
    def _power_w(self, i: int) -> float: ...

    # -- shared logic -------------------------------------------------------------------------
    def _probe(self, i: int) -> _GpuState:
        domain = f"{self.domain_prefix}{i}"
        device = self._device_name(i)
        try:
            raw = self._counter_j(i)
        except CounterUnavailable as exc:
            return _GpuState(i, domain, device, False, f"no energy counter ({exc}); power sampled")
        if raw <= 0:
            return _GpuState(
                i,
                domain,
                device,
                False,
                "energy counter reads 0 (virtual GPU or MIG slice?); power sampled",
            )
        return _GpuState(i, domain, device, True, last_raw_j=raw)

    def domains(self) -> list[DomainInfo]:
        return [
            DomainInfo(
                g.domain,
                self.name,
                "counter" if g.use_counter else "sampled",
                g.device,
                embodied_g_per_h=embodied_g_per_hour(match_device("gpu", g.device), "gpu"),
                note=g.note,
            )
            for g in self.gpus
        ]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        for g in self.gpus:
            p = self._power_w(g.index)
            if g.last_t_s is not None and g.last_power_w is not None:
                dt = max(t_s - g.last_t_s, 0.0)
                g.sampled_j += 0.5 * (p + g.last_power_w) * dt
                g.discretisation_j += 0.5 * abs(p - g.last_power_w) * dt
            g.last_power_w, g.last_t_s = p, t_s
            if g.use_counter:
                try:
                    raw = self._counter_j(g.index)
                except CounterUnavailable as exc:
                    raise MeterError(f"{g.domain}: energy counter read failed: {exc}") from exc
                if g.last_raw_j is not None and raw < g.last_raw_j:
                    g.epoch += 1  # reset or wrap: windows spanning it fall back to sampling
                elif g.last_raw_j is not None:
                    g.counter_j += raw - g.last_raw_j
                g.last_raw_j = raw
        return Reading(
            t_s,
            {g.domain: g.counter_j if g.use_counter else g.sampled_j for g in self.gpus},
            {
                "sampled_j": {g.domain: g.sampled_j for g in self.gpus},
                "disc_j": {g.domain: g.discretisation_j for g in self.gpus},
                "epoch": {g.domain: g.epoch for g in self.gpus},
            },
        )

    def _uncertainty(self, energy_j: float, duration_s: float) -> float:
        rel = abs(energy_j) * self.relative_uncertainty
        if self.sensor_accuracy_w is None:
            return rel
        return max(rel, self.sensor_accuracy_w * duration_s)

    def window_energy(self, start: Reading, end: Reading) -> dict[str, DomainEnergy]:
        dt = max(end.t_s - start.t_s, 0.0)
        out = {}
        for g in self.gpus:
            d = g.domain
            sampled = end.extra["sampled_j"][d] - start.extra["sampled_j"][d]
            disc = end.extra["disc_j"][d] - start.extra["disc_j"][d]
            method, energy, note = "sampled", sampled, None
            if g.use_counter:
                counted = end.energy_j[d] - start.energy_j[d]
                if end.extra["epoch"][d] != start.extra["epoch"][d]:
                    note = "energy counter went backwards during the window; used sampled power"
                elif dt < self.counter_period_s:
                    note = (
                        f"window of {dt * 1e3:.1f} ms is shorter than the energy counter's "
                        f"~{self.counter_period_s * 1e3:.0f} ms update period: energy = power x time"
                    )
                elif counted <= 0 < sampled:
                    note = "energy counter did not move while power was drawn; used sampled power"
                else:
                    method, energy = "counter", counted
            unc = self._uncertainty(energy, dt) + (disc if method == "sampled" else 0.0)
            out[d] = DomainEnergy(energy, method, unc, self.name, note=note)
        return out

    def power_w(self) -> dict[str, float]:
        """Current power of each GPU (watts), read now."""
        return {g.domain: self._power_w(g.index) for g in self.gpus}
