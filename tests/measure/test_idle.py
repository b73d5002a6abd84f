"""Idle baseline: measure, cache per backend setup, and apply to later measurements."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError, MeterError
from joules.measure import Meter
from joules.measure.estimate import EstimateBackend
from joules.measure.idle import idle_cache_path, load_idle, measure_idle, save_idle
from joules.testing.measure import FakeBackend, FakeClock


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))


def test_measure_save_and_apply(monkeypatch):
    import time

    fake = FakeBackend({"gpu0": 60.0, "package0": 20.0}, clock=time.monotonic)
    meter = Meter([fake], interval_s=None, idle_power_w=None)
    seen = []
    b = measure_idle(meter, seconds=0.3, progress=seen.append)
    assert b.idle_power_w == {"gpu0": pytest.approx(60.0), "package0": pytest.approx(20.0)}
    assert b.total_idle_power_w == pytest.approx(80.0) and b.seconds >= 0.3
    assert seen[0] == pytest.approx(0.0, abs=0.2) and seen[-1] == 1.0
    save_idle(b)
    assert idle_cache_path().is_file()
    assert load_idle(fake.idle_key()) == {
        "gpu0": pytest.approx(60.0),
        "package0": pytest.approx(20.0),
    }

    clock = FakeClock()
    fake2 = FakeBackend({"gpu0": 300.0, "package0": 20.0}, clock=clock)
    later = Meter([fake2], clock=clock, interval_s=None)  # idle "auto" finds the cache
    assert later.idle_source == "cached"
    with later.window() as w:
        clock.advance(2.0)
    m = w.measurement
    assert m.energy_j == 640.0 and m.idle_power_w == pytest.approx(80.0)
    assert m.net_energy_j == pytest.approx(640.0 - 160.0)
    assert "idle baseline: cached" in m.notes


def test_another_setup_does_not_use_the_baseline():
    clock = FakeClock()
    b = measure_idle(
        Meter(
            [FakeBackend({"gpu0": 60.0}, clock=_Ticking(clock))],
            clock=_Ticking(clock),
            interval_s=None,
            idle_power_w=None,
        ),
        0.01,
    )
    save_idle(b)
    other = Meter(
        [FakeBackend({"gpu0": 1.0, "gpu1": 1.0}, clock=clock)], clock=clock, interval_s=None
    )
    assert other.idle_power_w is None and other.idle_source == "none"


class _Ticking:
    """A FakeClock view that moves 0.01 s each time it is read (for the idle sleep loop)."""

    def __init__(self, clock):
        self.clock = clock

    def __call__(self):
        self.clock.advance(0.01)
        return self.clock()


def test_process_scope_estimate_uses_its_model_and_refuses_to_cache():
    meter = Meter([EstimateBackend("process")], interval_s=None)
    assert meter.idle_source == "model"
    with pytest.raises(MeterError, match="scope='system'"):
        measure_idle(meter, 0.1)
    with pytest.raises(ConfigError, match="seconds > 0"):
        measure_idle(meter, 0)


def test_system_estimate_baseline_round_trip():
    est = EstimateBackend("system")
    b = measure_idle(Meter([est], interval_s=None, idle_power_w=None), 0.2)
    save_idle(b)
    assert load_idle(est.idle_key())["cpu"] == pytest.approx(b.idle_power_w["cpu"])
    assert b.idle_power_w["cpu"] >= est.model.idle_w * 0.99  # never below the model's idle
    again = Meter([EstimateBackend("system")], interval_s=None)
    assert again.idle_source == "cached"


def test_corrupt_cache_is_ignored():
    idle_cache_path().parent.mkdir(parents=True)
    idle_cache_path().write_text("{not json")
    assert load_idle("anything") is None
    idle_cache_path().write_text('{"h|k": {"idle_power_w": "x"}}')
    assert load_idle("k") is None


def test_net_energy_is_none_when_a_domain_has_no_baseline():
    """A GPU without a baseline beside a CPU with its model idle: the GPU's idle is not 0 W."""
    clock = FakeClock()
    cpu = FakeBackend({"cpu": 10.0}, clock=clock, method="estimated", idle_w={"cpu": 4.0})
    gpu = FakeBackend({"gpu0": 300.0}, clock=clock)
    gpu.name = "fake-gpu"
    meter = Meter([cpu, gpu], clock=clock, interval_s=None)
    with meter.window() as w:
        clock.advance(2.0)
    m = w.measurement
    assert m.energy_j == pytest.approx(620.0)
    assert m.net_energy_j is None  # was 620 - 4 x 2: gross GPU energy called "net"
    assert m.uncovered_domains == ["gpu0"]
    assert m.net_energy_covered_j == pytest.approx(20.0 - 8.0)
    assert m.idle_power_w == pytest.approx(4.0)
    assert any("no idle baseline for gpu0" in n for n in m.notes)
    back = type(m).from_dict(m.to_dict())
    assert (back.net_energy_covered_j, back.uncovered_domains) == (
        m.net_energy_covered_j,
        ["gpu0"],
    )


def test_net_energy_complete_when_every_domain_has_a_baseline():
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 300.0, "package0": 20.0}, clock=clock)
    meter = Meter([fake], clock=clock, interval_s=None, idle_power_w={"gpu0": 50.0, "package0": 5})
    with meter.window() as w:
        clock.advance(2.0)
    m = w.measurement
    assert m.uncovered_domains == [] and m.net_energy_j == pytest.approx(640.0 - 110.0)
    assert m.net_energy_covered_j == m.net_energy_j


def test_idle_cache_keeps_the_baseline_uncertainty_and_net_energy_carries_it():
    clock = FakeClock()
    idle_meter = Meter(
        [FakeBackend({"gpu0": 60.0}, clock=_Ticking(clock), relative_uncertainty=0.05)],
        clock=_Ticking(clock),
        interval_s=None,
        idle_power_w=None,
    )
    b = measure_idle(idle_meter, 0.01)
    assert b.uncertainty_w_by_domain["gpu0"] == pytest.approx(0.05 * 60.0)
    save_idle(b)
    import json

    rec = next(iter(json.loads(idle_cache_path().read_text()).values()))
    assert rec["uncertainty_w"] == {"gpu0": pytest.approx(3.0)}

    clock2 = FakeClock()
    meter = Meter([FakeBackend({"gpu0": 66.0}, clock=clock2)], clock=clock2, interval_s=None)
    assert meter.idle_source == "cached"
    with meter.window() as w:
        clock2.advance(10.0)
    m = w.measurement
    assert m.net_energy_j == pytest.approx(660.0 - 600.0)  # 60 J net out of 660 J gross
    # gross ±5 % (33 J) plus the baseline's ±3 W over 10 s (30 J): ±63 J on a 60 J net figure
    assert m.net_uncertainty_j == pytest.approx(33.0 + 30.0)
