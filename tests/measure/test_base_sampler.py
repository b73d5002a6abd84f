"""The meter's background sampler under concurrency: no window without a sampler, no timeline
out of order. A lock wrapper pauses the sampler thread at the exact point of each race, so the
races happen on every run; a randomised stress test opens windows from many threads against a
counter that wraps fast (a missed background read loses a whole wrap)."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest

from joules.measure import Meter
from joules.measure.base import Backend, DomainInfo, Reading
from joules.testing.measure import FakeBackend, FakeClock


class PausingLock:
    """The meter's RLock, plus a one-shot pause: when the sampler thread leaves a ``with`` block
    in function ``where`` and ``when()`` holds, it stops right after releasing until ``go``."""

    def __init__(self, where: str, when=lambda: True) -> None:
        self._lock = threading.RLock()
        self.where, self.when = where, when
        self.paused, self.go = threading.Event(), threading.Event()
        self.armed = False

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        caller = sys._getframe(1).f_code.co_name
        self._lock.release()
        if (
            self.armed
            and threading.current_thread().name == "joules-meter"
            and caller == self.where
            and self.when()
        ):
            self.armed = False
            self.paused.set()
            assert self.go.wait(10.0), "test never released the sampler"


def test_begin_right_after_the_sampler_decides_to_stop_still_gets_a_sampler():
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 100.0}, clock=clock)
    meter = Meter([fake], clock=clock, interval_s=0.002, idle_power_w=None)
    # pause the sampler between its stop decision (no window open, linger over) and what follows
    lock = PausingLock(
        "_run_sampler", when=lambda: not meter._open and clock() - meter._last_close_s > 1.0
    )
    meter._lock = lock
    try:
        with meter.window("first"):
            clock.advance(0.1)
        lock.armed = True
        clock.advance(5.0)  # past the linger: the sampler's next check decides to stop
        assert lock.paused.wait(10.0)
        w = meter.begin("second")  # in the gap between the decision and the reset
        lock.go.set()
        time.sleep(0.05)
        t = meter._thread
        assert t is not None and t.is_alive(), "a window is open and no sampler runs"
        reads = fake.reads
        time.sleep(0.1)
        assert fake.reads > reads  # background reads go on while the window is open
        meter.end(w)
    finally:
        lock.go.set()
        meter.close()


def test_a_background_read_is_appended_before_a_later_boundary_read():
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 100.0}, clock=clock)
    meter = Meter([fake], clock=clock, interval_s=0.002, idle_power_w=None, timeline=True)
    # pause the sampler between its read and its append
    lock = PausingLock("_read_all")
    meter._lock = lock
    try:
        w = meter.begin("w")
        lock.armed = True
        assert lock.paused.wait(10.0)
        clock.advance(1.0)
        ender = threading.Thread(target=meter.end, args=(w,))
        ender.start()  # a boundary read 1 s later than the paused background read
        ender.join(0.2)
        lock.go.set()
        ender.join(10.0)
        meter.close()  # joins the sampler: its paused read has been appended by now
        ts = [t for t, _ in meter._samples]
        assert len(ts) >= 3 and ts == sorted(ts), f"timeline out of order: {ts}"
    finally:
        lock.go.set()
        meter.close()


class WrappingCounter(Backend):
    """A RAPL-like counter: true energy modulo ``range_j``, unwrapped read to read (a gap longer
    than one wrap loses a whole ``range_j``)."""

    name = "wrap"

    def __init__(self, power_w: float, wrap_s: float) -> None:
        super().__init__()
        self.power_w, self.range_j = power_w, power_w * wrap_s
        self._t0 = time.monotonic()
        self._last_raw: float | None = None
        self._total_j = 0.0

    def domains(self) -> list[DomainInfo]:
        return [DomainInfo("package0", self.name, "counter")]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        raw = (self.power_w * (t_s - self._t0)) % self.range_j
        if self._last_raw is not None:
            self._total_j += (raw - self._last_raw) % self.range_j
        self._last_raw = raw
        return Reading(t_s, {"package0": self._total_j})


@pytest.mark.parametrize("seed", [0, 1])
def test_stress_many_threads_short_and_long_windows_on_a_fast_wrapping_counter(seed):
    rng = random.Random(seed)
    wrap_s = 0.25  # the counter wraps 4 times a second; reads come every 0.005 s
    meter = Meter([WrappingCounter(100.0, wrap_s)], interval_s=0.005, idle_power_w=None)
    meter._linger_s = 0.01  # let the sampler stop and restart often: that is where races live
    results: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def worker(plan: list[tuple[float, float]]) -> None:
        try:
            for gap_s, length_s in plan:
                time.sleep(gap_s)
                with meter.window("w") as w:
                    time.sleep(length_s)
                m = w.measurement
                results.append((m.energy_j, m.duration_s))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    plans = [
        [(rng.choice([0.0, 0.012, 0.02]), rng.choice([0.001, 0.01, 0.6])) for _ in range(4)]
        for _ in range(4)
    ]
    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    meter.close()
    assert not errors and len(results) == 16
    for energy_j, duration_s in results:
        # a window longer than a wrap with no background read in it loses 25 J
        assert energy_j == pytest.approx(100.0 * duration_s, abs=2.0)
    ts = [t for t, _ in meter._samples]
    assert ts == sorted(ts)
