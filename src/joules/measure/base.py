"""The energy-meter core: a narrow backend seam, the :class:`Meter` with its windows, and the
JSON-serializable :class:`Measurement` every joule joules reports ends up in.

    >>> from joules.measure import Meter
    >>> from joules.testing.measure import FakeBackend, FakeClock
    >>> clock = FakeClock()
    >>> meter = Meter([FakeBackend({"gpu0": 100.0}, clock=clock)], clock=clock, interval_s=None)
    >>> with meter.window("decode") as w:
    ...     clock.advance(2.0)
    >>> w.measurement.energy_j, w.measurement.method
    (200.0, 'counter')

A backend (``nvml``, ``rapl``, ``estimate``, ``amd``, ``fake``) exposes one or more *domains*
(``gpu0``, ``package0``, ``package0.dram``, ``cpu``...) as cumulative energy since the backend
started. A window reads every backend when it begins and when it ends; its energy is the
difference, so windows nest and overlap freely and cost two reads each. A background thread
reads every ``interval_s`` seconds (10 Hz by default) while any window is open: it keeps wrapping
counters exact (RAPL), integrates sampled power (NVML without an energy counter), and records
the optional power timeline.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from joules.errors import MeterError
from joules.measure.carbon import CarbonConfig
from joules.measure.idle import load_idle_with_uncertainty

METHODS = ("counter", "sampled", "estimated")
# A window's overall method is its least direct domain's: one estimated domain makes the total
# an estimate.
_METHOD_RANK = {m: i for i, m in enumerate(METHODS)}


@dataclass(frozen=True)
class DomainInfo:
    """One metered domain: what it is called, which backend reads it and how."""

    name: str  # "gpu0", "package0", "package0.dram", "cpu", "dram"
    backend: str  # "nvml" | "rapl" | "estimate" | "amd" | "fake"
    method: str  # "counter" | "sampled" | "estimated" (when the domain is healthy)
    device: str = ""  # human-readable device name
    # False for domains already contained in another one (RAPL core/uncore are part of their
    # package): they are reported but not added to the total.
    in_total: bool = True
    embodied_g_per_h: float = 0.0  # embodied carbon of the device amortised per hour of use
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DomainEnergy:
    """The energy one domain used during one window."""

    energy_j: float
    method: str
    uncertainty_j: float
    backend: str
    in_total: bool = True
    idle_power_w: float | None = None
    note: str | None = None
    idle_uncertainty_w: float | None = None  # the baseline's own uncertainty (W)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reading:
    """A backend's cumulative state at one instant: joules per domain since the backend started.

    ``extra`` carries backend-private state a backend needs to judge a window (NVML keeps its
    sampled integral and counter epoch there).
    """

    t_s: float
    energy_j: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PowerTimeline:
    """Average power per domain between consecutive reads; ``t_s`` is each interval's end,
    in seconds from the window's start."""

    t_s: list[float]
    power_w: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"t_s": self.t_s, "power_w": self.power_w}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PowerTimeline:
        return cls(list(d["t_s"]), {k: list(v) for k, v in d["power_w"].items()})


@dataclass
class Measurement:
    """Energy of one window, per domain and in total, with its uncertainty, baseline and carbon.

    ``energy_j`` is gross (everything the domains drew). ``uncertainty_j`` is the sum of the
    domains' uncertainties (errors of sensors of one kind are correlated, so they are added, not
    combined in quadrature).

    Net energy subtracts idle power x duration, domain by domain, where a domain has an idle
    baseline (``joules idle``, or the estimator's model idle). ``net_energy_j`` is set only when
    *every* domain in the total has one; otherwise it is None, ``net_energy_covered_j`` is the net
    energy of the domains that have one (gross minus idle over those domains only) and
    ``uncovered_domains`` names the others. ``idle_power_w`` is the idle power of the covered
    domains. ``net_uncertainty_j`` is the uncertainty of whichever net figure is set: the covered
    domains' gross uncertainty plus each baseline's own uncertainty x duration (added, as above:
    a ±5 % gross band can be ±50 % of a small net figure).
    """

    name: str
    duration_s: float
    energy_j: float
    method: str
    uncertainty_j: float
    domains: dict[str, DomainEnergy]
    idle_power_w: float | None = None
    net_energy_j: float | None = None
    net_energy_covered_j: float | None = None
    net_uncertainty_j: float | None = None
    uncovered_domains: list[str] = field(default_factory=list)
    co2_g: float | None = None
    water_l: float | None = None
    carbon: dict[str, Any] | None = None  # CarbonResult.to_dict(): grid, PUE, WUE, breakdown
    timeline: PowerTimeline | None = None
    notes: list[str] = field(default_factory=list)
    start_unix_s: float = 0.0

    @property
    def avg_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / 3.6e6

    @property
    def energy_j_by_domain(self) -> dict[str, float]:
        return {k: d.energy_j for k, d in self.domains.items()}

    @property
    def relative_uncertainty(self) -> float:
        return self.uncertainty_j / self.energy_j if self.energy_j > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "avg_power_w": self.avg_power_w,
            "method": self.method,
            "uncertainty_j": self.uncertainty_j,
            "idle_power_w": self.idle_power_w,
            "net_energy_j": self.net_energy_j,
            "net_energy_covered_j": self.net_energy_covered_j,
            "net_uncertainty_j": self.net_uncertainty_j,
            "uncovered_domains": list(self.uncovered_domains),
            "co2_g": self.co2_g,
            "water_l": self.water_l,
            "domains": {k: d.to_dict() for k, d in self.domains.items()},
            "carbon": self.carbon,
            "timeline": self.timeline.to_dict() if self.timeline else None,
            "notes": list(self.notes),
            "start_unix_s": self.start_unix_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """Inverse of :meth:`to_dict` (``avg_power_w`` is derived, so it is not read back)."""
        return cls(
            name=d["name"],
            duration_s=d["duration_s"],
            energy_j=d["energy_j"],
            method=d["method"],
            uncertainty_j=d["uncertainty_j"],
            domains={k: DomainEnergy(**v) for k, v in d["domains"].items()},
            idle_power_w=d.get("idle_power_w"),
            net_energy_j=d.get("net_energy_j"),
            net_energy_covered_j=d.get("net_energy_covered_j"),
            net_uncertainty_j=d.get("net_uncertainty_j"),
            uncovered_domains=list(d.get("uncovered_domains", [])),
            co2_g=d.get("co2_g"),
            water_l=d.get("water_l"),
            carbon=d.get("carbon"),
            timeline=PowerTimeline.from_dict(d["timeline"]) if d.get("timeline") else None,
            notes=list(d.get("notes", [])),
            start_unix_s=d.get("start_unix_s", 0.0),
        )


def synchronize_gpus() -> bool:
    """Wait for the kernels queued on the current CUDA device; True if it waited.

    A window closing while kernels are still queued would miss their energy (and a window
    opening would count earlier work), so windows synchronise at both ends, as Zeus does. Only
    when torch is already imported and CUDA already initialised: the meter never imports torch
    (``joules measure`` stays torch-free) and never creates a CUDA context.
    """
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return False
    cuda.synchronize()
    return True


class Backend(ABC):
    """One kind of energy source. Subclasses read their devices and nothing else.

    ``read`` must be cheap (it runs at 10 Hz) and is always called under the meter's lock, so a
    backend need not lock itself.
    """

    name: str = "backend"
    #: relative uncertainty of a counter/sampled reading of this backend (documented per backend)
    relative_uncertainty: float = 0.05

    def __init__(self) -> None:
        self.notes: list[str] = []

    @abstractmethod
    def domains(self) -> list[DomainInfo]:
        """The domains this backend meters."""

    @abstractmethod
    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        """Cumulative joules per domain at monotonic time ``t_s``.

        ``precise`` is True at window boundaries: a backend may then do more expensive work
        it skips in the 10 Hz background reads (the estimator rescans the process tree).
        """

    def window_energy(self, start: Reading, end: Reading) -> dict[str, DomainEnergy]:
        """Energy per domain between two readings (the default: counter difference)."""
        out = {}
        for d in self.domains():
            e = end.energy_j[d.name] - start.energy_j[d.name]
            out[d.name] = DomainEnergy(
                energy_j=e,
                method=d.method,
                uncertainty_j=abs(e) * self.relative_uncertainty,
                backend=self.name,
                in_total=d.in_total,
            )
        return out

    def model_idle_power_w(self) -> dict[str, float] | None:
        """Idle power per domain known from the backend's own model (the estimator), else None."""
        return None

    def idle_key(self) -> str | None:
        """A string identifying this backend's setup for the idle-baseline cache, or None when a
        cached baseline must not apply (the estimator in process scope uses its model idle)."""
        return ";".join(f"{self.name}:{d.name}:{d.device}" for d in self.domains())

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release devices (NVML shutdown...)."""


@dataclass
class Window:
    """An open (or closed) measurement window; ``measurement`` is set when it ends, and ``end``
    holds the backends' readings it ended on (as ``start`` holds those it began on: a check can
    compare what a backend keeps beside its figure, e.g. NVML's sampled integral)."""

    name: str
    start: dict[str, Reading]
    start_unix_s: float
    timeline: bool
    measurement: Measurement | None = None
    end: dict[str, Reading] | None = None

    @property
    def open(self) -> bool:
        return self.measurement is None


class Meter:
    """Measures energy over windows across every backend it was given.

    ``interval_s``: background read period (None: no thread; only window boundaries are read,
    enough for counters over short windows and for tests with a fake clock). ``timeline``: attach
    a power timeline to every measurement (a window may also ask for one). ``carbon``: a
    :class:`joules.measure.carbon.CarbonConfig` (world-average grid, PUE 1.0 when None).
    ``idle_power_w``: per-domain idle baseline to subtract; "auto" loads the cached baseline that
    ``joules idle`` measured for this exact meter setup, falling back to the backends' models.
    ``synchronize``: wait for queued CUDA kernels at each window boundary
    (:func:`synchronize_gpus`; a no-op unless torch has initialised CUDA).
    """

    def __init__(
        self,
        backends: list[Backend],
        *,
        interval_s: float | None = 0.1,
        timeline: bool = False,
        carbon: Any = None,
        idle_power_w: dict[str, float] | str | None = "auto",
        clock: Callable[[], float] = time.monotonic,
        notes: list[str] | None = None,
        max_samples: int = 36_000,  # one hour of timeline at 10 Hz
        synchronize: bool = True,
    ) -> None:
        if not backends:
            raise MeterError("a Meter needs at least one backend: use detect_meter()")
        if interval_s is not None and interval_s <= 0:
            raise MeterError(f"interval_s must be > 0 seconds, got {interval_s}")
        names = [d.name for b in backends for d in b.domains()]
        if len(set(names)) != len(names):
            raise MeterError(f"two backends meter the same domain: {sorted(names)}")
        self.backends = list(backends)
        self.interval_s = interval_s
        self.timeline = timeline
        self.synchronize = synchronize
        self.clock = clock
        self.notes = list(notes or []) + [n for b in backends for n in b.notes]
        if carbon is None:
            carbon = CarbonConfig()
        self.carbon = carbon
        self._lock = threading.RLock()
        self._open: list[Window] = []
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=max_samples)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_close_s = 0.0
        # keep the thread across back-to-back windows
        self._linger_s = max(1.0, 5 * interval_s) if interval_s is not None else 0.0
        self.last: Measurement | None = None
        self.idle_source = "none"
        self.idle_power_w: dict[str, float] | None = None
        # the baselines' own uncertainty per domain (W), same keys as idle_power_w
        self.idle_uncertainty_w: dict[str, float] = {}
        self._set_idle(idle_power_w)

    # -- setup -------------------------------------------------------------------------------
    def domains(self) -> list[DomainInfo]:
        return [d for b in self.backends for d in b.domains()]

    def domain_idle_keys(self) -> dict[str, str | None]:
        """Per domain, the idle-cache key of its backend (None: the backend's model idle)."""
        return {d.name: b.idle_key() for b in self.backends for d in b.domains()}

    def _set_idle(self, idle: dict[str, float] | str | None) -> None:
        # A baseline without a known uncertainty (given by the caller, a model idle, a cache entry
        # written before uncertainties were stored) gets its backend's relative uncertainty.
        rel = {d.name: b.relative_uncertainty for b in self.backends for d in b.domains()}
        if isinstance(idle, dict):
            self.idle_power_w, self.idle_source = dict(idle), "given"
            self.idle_uncertainty_w = {k: abs(v) * rel.get(k, 0.0) for k, v in idle.items()}
            return
        if idle is None:
            return
        if idle != "auto":
            raise MeterError(f"idle_power_w must be a dict, 'auto' or None, got {idle!r}")
        found: dict[str, float] = {}
        sources = set()
        for b in self.backends:
            key = b.idle_key()
            cached = load_idle_with_uncertainty(key) if key else None
            model = b.model_idle_power_w()
            if cached is not None:
                power, unc = cached
                found.update(power)
                for k, v in power.items():
                    self.idle_uncertainty_w[k] = unc.get(k, abs(v) * b.relative_uncertainty)
                sources.add("cached")
            elif model is not None:
                found.update(model)
                for k, v in model.items():
                    self.idle_uncertainty_w[k] = abs(v) * b.relative_uncertainty
                sources.add("model")
        if found:
            self.idle_power_w = found
            self.idle_source = "+".join(sorted(sources))

    # -- reading -----------------------------------------------------------------------------
    def _read_all(self, precise: bool) -> dict[str, Reading]:
        with self._lock:
            t = self.clock()
            return {
                b.name + str(i): b.read(t, precise=precise) for i, b in enumerate(self.backends)
            }

    def _sample(self) -> None:
        # Read and append under one hold of the lock: released in between, a window boundary
        # could read later and append first, and the timeline would go back in time.
        with self._lock:
            self._record(self._read_all(precise=False))

    def _record(self, readings: dict[str, Reading]) -> None:
        t = max(r.t_s for r in readings.values())
        flat = {k: v for r in readings.values() for k, v in r.energy_j.items()}
        with self._lock:
            self._samples.append((t, flat))

    def _run_sampler(self) -> None:
        assert self.interval_s is not None
        try:
            while not self._stop.wait(self.interval_s):
                with self._lock:
                    if not self._open and self.clock() - self._last_close_s > self._linger_s:
                        # Decide and let go in one hold of the lock: a begin() after this sees
                        # no sampler and starts one (cleared later, it would start none).
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                try:
                    self._sample()
                except Exception as exc:  # the window's end reads again and raises if still broken
                    note = f"background read failed: {exc}"
                    if note not in self.notes:  # once, not ten times a second
                        self.notes.append(note)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _ensure_sampler(self) -> None:
        if self.interval_s is None:
            return
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run_sampler, name="joules-meter", daemon=True
                )
                self._thread.start()

    # -- windows -----------------------------------------------------------------------------
    def begin(self, name: str = "window", *, timeline: bool | None = None) -> Window:
        """Open a window now; end it with :meth:`end` (by name or by the returned object)."""
        if self.synchronize:
            synchronize_gpus()  # work queued before the window is not the window's
        with self._lock:
            readings = self._read_all(precise=True)
            self._record(readings)
            w = Window(
                name, readings, time.time(), self.timeline if timeline is None else bool(timeline)
            )
            self._open.append(w)
            self._ensure_sampler()
        return w

    def end(self, window: str | Window) -> Measurement:
        """Close a window (the most recent open one of that name) and return its measurement."""
        if self.synchronize:
            synchronize_gpus()  # the window's kernels have run before its end is read
        with self._lock:
            end = self._read_all(precise=True)
            self._record(end)
            w = self._find_open(window)
            self._open.remove(w)
            if not self._open:
                self._last_close_s = self.clock()
        w.end = end
        w.measurement = self._measure(w, end)
        self.last = w.measurement
        return w.measurement

    def _find_open(self, window: str | Window) -> Window:
        if isinstance(window, Window):
            if window not in self._open:
                raise MeterError(f"window {window.name!r} is not open (ended twice?)")
            return window
        for w in reversed(self._open):
            if w.name == window:
                return w
        raise MeterError(f"no open window named {window!r}: call meter.begin({window!r}) first")

    @contextmanager
    def window(self, name: str = "window", *, timeline: bool | None = None) -> Iterator[Window]:
        """``with meter.window("decode") as w: ...`` then ``w.measurement``."""
        w = self.begin(name, timeline=timeline)
        try:
            yield w
        finally:
            if w.open:
                self.end(w)

    def measure(self, fn: Callable | None = None, *, name: str | None = None) -> Any:
        """Decorator: each call runs in a window; ``wrapper.measurements`` keeps the results."""

        def deco(f: Callable) -> Callable:
            label = name or getattr(f, "__name__", "call")

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with self.window(label) as w:
                    result = f(*args, **kwargs)
                wrapper.measurements.append(w.measurement)  # type: ignore[attr-defined]
                return result

            wrapper.measurements = []  # type: ignore[attr-defined]
            return wrapper

        return deco(fn) if fn is not None else deco

    # -- turning readings into a Measurement -------------------------------------------------
    def _measure(self, w: Window, end: dict[str, Reading]) -> Measurement:
        t0 = max(r.t_s for r in w.start.values())
        t1 = max(r.t_s for r in end.values())
        duration_s = max(t1 - t0, 0.0)
        domains: dict[str, DomainEnergy] = {}
        notes: list[str] = []
        for key, b in zip(end, self.backends, strict=True):
            for dname, de in b.window_energy(w.start[key], end[key]).items():
                if de.energy_j < 0:  # never report negative energy: say so and clamp
                    notes.append(f"{dname}: counter went backwards ({de.energy_j:.3f} J); set to 0")
                    de.energy_j = 0.0
                if self.idle_power_w is not None and dname in self.idle_power_w:
                    de.idle_power_w = self.idle_power_w[dname]
                    de.idle_uncertainty_w = self.idle_uncertainty_w.get(dname, 0.0)
                if de.note:
                    notes.append(f"{dname}: {de.note}")
                domains[dname] = de
        counted = [d for d in domains.values() if d.in_total]
        energy_j = sum(d.energy_j for d in counted)
        uncertainty_j = sum(d.uncertainty_j for d in counted)
        method = max((d.method for d in counted), key=_METHOD_RANK.__getitem__, default="counter")
        # Net energy only over domains with a baseline: a missing one is not 0 W idle.
        covered = [d for d in counted if d.idle_power_w is not None]
        uncovered = [k for k, d in domains.items() if d.in_total and d.idle_power_w is None]
        idle_w = net_covered_j = net_unc_j = net_j = None
        if covered:
            idle_w = sum(d.idle_power_w or 0.0 for d in covered)
            net_covered_j = sum(d.energy_j for d in covered) - idle_w * duration_s
            net_unc_j = sum(
                d.uncertainty_j + (d.idle_uncertainty_w or 0.0) * duration_s for d in covered
            )
            if not uncovered:
                net_j = net_covered_j
        carbon = self.carbon.assess(
            energy_j, duration_s, sum(d.embodied_g_per_h for d in self.domains() if d.in_total)
        )
        return Measurement(
            name=w.name,
            duration_s=duration_s,
            energy_j=energy_j,
            method=method,
            uncertainty_j=uncertainty_j,
            domains=domains,
            idle_power_w=idle_w,
            net_energy_j=net_j,
            net_energy_covered_j=net_covered_j,
            net_uncertainty_j=net_unc_j,
            uncovered_domains=uncovered,
            co2_g=carbon.co2_g,
            water_l=carbon.water_l,
            carbon=carbon.to_dict(),
            timeline=self._timeline(t0, t1) if w.timeline else None,
            notes=self.notes + notes + self._idle_notes(idle_w, uncovered),
            start_unix_s=w.start_unix_s,
        )

    def _idle_notes(self, idle_w: float | None, uncovered: list[str]) -> list[str]:
        notes = [f"idle baseline: {self.idle_source}"] if idle_w is not None else []
        if idle_w is not None and uncovered:
            notes.append(
                f"net energy not computed: no idle baseline for {', '.join(uncovered)} "
                "(run `joules idle`); net_energy_covered_j covers the other domains"
            )
        return notes

    def _timeline(self, t0: float, t1: float) -> PowerTimeline:
        with self._lock:
            pts = [(t, e) for t, e in self._samples if t0 <= t <= t1]
        ts: list[float] = []
        power: dict[str, list[float]] = {d.name: [] for d in self.domains()}
        for (ta, ea), (tb, eb) in itertools.pairwise(pts):
            if tb - ta <= 1e-6:
                continue
            ts.append(round(tb - t0, 6))
            for k in power:
                power[k].append((eb[k] - ea[k]) / (tb - ta))
        return PowerTimeline(ts, power)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread and release every backend."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2.0)
        self._thread = None
        for b in self.backends:
            b.close()

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> list[dict[str, Any]]:
        """One dict per domain (domain, backend, method, device, note): what doctor prints."""
        return [
            {
                "domain": d.name,
                "backend": d.backend,
                "method": d.method,
                "device": d.device,
                "in_total": d.in_total,
                "note": d.note,
            }
            for d in self.domains()
        ]
