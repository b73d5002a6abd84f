"""A scripted energy backend and clock, so every meter code path runs in CPU-only CI.

    >>> from joules.measure import Meter
    >>> from joules.measure.fake import FakeBackend, FakeClock
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
