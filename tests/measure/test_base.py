"""Meter windows on the fake backend: exact energy, nesting, overlap, errors, serialization."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joules.errors import MeterError
from joules.measure import Measurement, Meter
from joules.measure.base import Backend, DomainEnergy, DomainInfo, Reading
from joules.testing.measure import FakeBackend, FakeClock


@pytest.fixture
def rig():
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 300.0, "package0": 50.0}, clock=clock)
    return clock, fake, Meter([fake], clock=clock, interval_s=None, idle_power_w=None)


def test_window_energy_is_power_times_time_per_domain(rig):
    clock, fake, meter = rig
    with meter.window("decode") as w:
        clock.advance(2.0)
        fake.set_power("gpu0", 100.0)
        clock.advance(1.0)
    m = w.measurement
    assert m.energy_j_by_domain == {"gpu0": 700.0, "package0": 150.0}
    assert m.energy_j == 850.0
    assert m.duration_s == 3.0
    assert m.avg_power_w == pytest.approx(850.0 / 3.0)
    assert m.method == "counter"
    assert m.uncertainty_j == pytest.approx(0.05 * 850.0)
    assert m.net_energy_j is None and m.idle_power_w is None  # no baseline given


def test_windows_nest_and_overlap(rig):
    clock, _, meter = rig
    outer = meter.begin("outer")
    clock.advance(1.0)
    a = meter.begin("a")
    clock.advance(1.0)
    b = meter.begin("b")  # overlaps a: a ends before b
    clock.advance(1.0)
    ma = meter.end("a")
    clock.advance(1.0)
    mb = meter.end(b)
    mo = meter.end(outer)
    assert (mo.duration_s, ma.duration_s, mb.duration_s) == (4.0, 2.0, 2.0)
    assert mo.energy_j == 4 * 350.0 and ma.energy_j == 2 * 350.0 and mb.energy_j == 2 * 350.0
    assert not a.open and ma is a.measurement


def test_end_errors_are_one_line(rig):
    _, _, meter = rig
    with pytest.raises(MeterError, match="no open window named 'x'"):
        meter.end("x")
    w = meter.begin("w")
    meter.end(w)
    with pytest.raises(MeterError, match="not open"):
        meter.end(w)


def test_same_name_ends_the_most_recent(rig):
    clock, _, meter = rig
    meter.begin("step")
    clock.advance(1.0)
    meter.begin("step")
    clock.advance(1.0)
    assert meter.end("step").duration_s == 1.0
    assert meter.end("step").duration_s == 2.0


def test_decorator_measures_each_call(rig):
    clock, _, meter = rig

    @meter.measure
    def work(dt):
        clock.advance(dt)
        return dt * 2

    assert work(1.0) == 2.0 and work(0.5) == 1.0
    assert [m.energy_j for m in work.measurements] == [350.0, 175.0]
    assert work.measurements[0].name == "work"
    named = meter.measure(name="prefill")(lambda: clock.advance(1.0))
    named()
    assert named.measurements[0].name == "prefill"
    assert meter.last is named.measurements[0]


def test_window_ends_on_exception(rig):
    clock, _, meter = rig
    with pytest.raises(RuntimeError), meter.window("boom") as w:
        clock.advance(1.0)
        raise RuntimeError("x")
    assert w.measurement is not None and w.measurement.energy_j == 350.0


def test_measurement_round_trips_through_json(rig):
    clock, _, meter = rig
    meter.idle_power_w = {"gpu0": 60.0, "package0": 10.0}
    with meter.window("gen", timeline=True) as w:
        for _ in range(3):
            clock.advance(0.1)
            meter._sample()
    m = w.measurement
    text = json.dumps(m.to_dict())
    back = Measurement.from_dict(json.loads(text))
    assert back == m
    d = json.loads(text)
    for key in (
        "energy_j",
        "duration_s",
        "avg_power_w",
        "method",
        "uncertainty_j",
        "idle_power_w",
        "net_energy_j",
        "co2_g",
        "water_l",
        "domains",
        "timeline",
    ):
        assert key in d
    assert d["domains"]["gpu0"]["method"] == "counter"
    assert d["net_energy_j"] == pytest.approx(m.energy_j - 70.0 * m.duration_s)


def test_timeline_gives_power_per_interval(rig):
    clock, fake, meter = rig
    with meter.window("t", timeline=True) as w:
        clock.advance(0.1)
        meter._sample()
        fake.set_power("gpu0", 500.0)
        clock.advance(0.1)
        meter._sample()
    tl = w.measurement.timeline
    assert tl.t_s == pytest.approx([0.1, 0.2])
    assert tl.power_w["gpu0"] == pytest.approx([300.0, 500.0])
    assert tl.power_w["package0"] == pytest.approx([50.0, 50.0])
    with meter.window("no timeline") as w2:
        clock.advance(0.1)
    assert w2.measurement.timeline is None


class _Nested(Backend):
    """A package with a core sub-domain that is inside it, and a counter that can go back."""

    name = "nested"

    def __init__(self):
        super().__init__()
        self.e = {"pkg": 0.0, "pkg.core": 0.0}

    def domains(self):
        return [
            DomainInfo("pkg", self.name, "counter"),
            DomainInfo("pkg.core", self.name, "counter", in_total=False),
        ]

    def read(self, t_s, *, precise=False):
        return Reading(t_s, dict(self.e))


def test_contained_domains_are_reported_but_not_added():
    clock = FakeClock()
    nb = _Nested()
    meter = Meter([nb], clock=clock, interval_s=None, idle_power_w=None)
    w = meter.begin("w")
    nb.e = {"pkg": 10.0, "pkg.core": 6.0}
    clock.advance(1.0)
    m = meter.end(w)
    assert m.energy_j == 10.0 and m.domains["pkg.core"].energy_j == 6.0


def test_negative_energy_is_clamped_and_said():
    clock = FakeClock()
    nb = _Nested()
    nb.e = {"pkg": 10.0, "pkg.core": 0.0}
    meter = Meter([nb], clock=clock, interval_s=None, idle_power_w=None)
    w = meter.begin("w")
    nb.e = {"pkg": 4.0, "pkg.core": 0.0}
    clock.advance(1.0)
    m = meter.end(w)
    assert m.energy_j == 0.0
    assert any("went backwards" in n for n in m.notes)


def test_overall_method_is_the_least_direct_domain():
    clock = FakeClock()
    a = FakeBackend({"gpu0": 100.0}, clock=clock)
    b = FakeBackend({"cpu": 10.0}, clock=clock, method="estimated", relative_uncertainty=0.3)
    b.name = "est"
    meter = Meter([a, b], clock=clock, interval_s=None, idle_power_w=None)
    with meter.window() as w:
        clock.advance(1.0)
    assert w.measurement.method == "estimated"
    assert w.measurement.uncertainty_j == pytest.approx(5.0 + 3.0)


def test_meter_rejects_bad_setup():
    clock = FakeClock()
    with pytest.raises(MeterError, match="at least one backend"):
        Meter([], clock=clock)
    with pytest.raises(MeterError, match="same domain"):
        Meter([FakeBackend({"x": 1.0}, clock=clock), FakeBackend({"x": 1.0}, clock=clock)])
    with pytest.raises(MeterError, match="interval_s"):
        Meter([FakeBackend({"x": 1.0}, clock=clock)], interval_s=0)


def test_model_idle_gives_net_energy():
    clock = FakeClock()
    fake = FakeBackend({"cpu": 30.0}, clock=clock, idle_w={"cpu": 10.0})
    meter = Meter([fake], clock=clock, interval_s=None)  # idle "auto": model idle
    with meter.window() as w:
        clock.advance(2.0)
    m = w.measurement
    assert meter.idle_source == "model"
    assert (m.idle_power_w, m.energy_j, m.net_energy_j) == (10.0, 60.0, 40.0)


def test_background_thread_samples_while_a_window_is_open_then_stops():
    fake = FakeBackend({"gpu0": 100.0}, clock=time.monotonic)
    meter = Meter([fake], interval_s=0.01, idle_power_w=None)
    with meter.window("w", timeline=True) as w:
        time.sleep(0.3)
    assert fake.reads >= 5  # 2 boundary reads + background reads
    tl = w.measurement.timeline
    assert len(tl.t_s) >= 3
    assert all(p == pytest.approx(100.0) for p in tl.power_w["gpu0"])
    assert w.measurement.energy_j == pytest.approx(100.0 * w.measurement.duration_s)
    deadline = time.monotonic() + 5.0
    while meter._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter._thread is None  # lingered ~1 s, then exited on its own
    meter.close()


def test_domain_energy_serializes():
    d = DomainEnergy(1.0, "sampled", 0.1, "nvml", note="short")
    assert DomainEnergy(**d.to_dict()) == d


def test_a_failing_background_read_is_noted_once_and_the_window_still_ends():
    class Flaky(FakeBackend):
        fail = False

        def read(self, t_s, *, precise=False):
            if self.fail and not precise:
                raise OSError("device went away")
            return super().read(t_s, precise=precise)

    fake = Flaky({"gpu0": 10.0}, clock=time.monotonic)
    meter = Meter([fake], interval_s=0.01, idle_power_w=None)
    w = meter.begin("w")
    fake.fail = True
    time.sleep(0.15)
    m = meter.end(w)
    assert [n for n in m.notes if "background read failed" in n] == [
        "background read failed: device went away"
    ]
    assert m.energy_j == pytest.approx(10.0 * m.duration_s)
    meter.close()


@settings(max_examples=50, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["begin", "end", "power"]),
            st.integers(0, 4),
            st.floats(0.0, 2.0),
            st.floats(0.0, 500.0),
        ),
        max_size=40,
    )
)
def test_property_interleaved_windows_each_get_the_energy_of_their_span(ops):
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 100.0}, clock=clock)
    meter = Meter([fake], clock=clock, interval_s=None, idle_power_w=None)
    open_w = {}  # window index -> (window, energy of the reference integral at its start)
    ref = 0.0
    power = 100.0
    for op, idx, dt, p in ops:
        clock.advance(dt)
        ref += power * dt
        if op == "begin" and idx not in open_w:
            open_w[idx] = (meter.begin(f"w{idx}"), ref)
        elif op == "end" and idx in open_w:
            w, start = open_w.pop(idx)
            assert meter.end(w).energy_j == pytest.approx(ref - start, abs=1e-6)
        elif op == "power":
            fake.set_power("gpu0", p)
            power = p
    for w, start in open_w.values():
        assert meter.end(w).energy_j == pytest.approx(ref - start, abs=1e-6)


class _FakeCuda:
    """torch.cuda's two calls the meter makes, recording into ``log``."""

    def __init__(self, log: list[str], initialized: bool) -> None:
        self.log, self.initialized = log, initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def synchronize(self) -> None:
        self.log.append("sync")


class _LoggingBackend(FakeBackend):
    def __init__(self, log, **kw):
        super().__init__({"gpu0": 100.0}, **kw)
        self.log = log

    def read(self, t_s, *, precise=False):
        self.log.append("read")
        return super().read(t_s, precise=precise)


@pytest.mark.parametrize("initialized", [True, False])
def test_windows_synchronise_cuda_before_reading_only_when_torch_initialised_it(
    monkeypatch, initialized
):
    import sys
    import types

    log: list[str] = []
    monkeypatch.setitem(
        sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda(log, initialized))
    )
    clock = FakeClock()
    meter = Meter([_LoggingBackend(log, clock=clock)], clock=clock, interval_s=None)
    with meter.window():
        clock.advance(1.0)
        log.append("work")
    expected = ["sync", "read", "work", "sync", "read"] if initialized else ["read", "work", "read"]
    assert log == expected


def test_measure_command_stays_torch_free():
    """The synchronisation looks torch up in sys.modules; `joules measure` never imports it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from joules.cli import app\n"
        "r = CliRunner().invoke(app, ['measure', '--json', '--', 'true'])\n"
        "print(r.exit_code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr[-2000:]
