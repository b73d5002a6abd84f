"""Idle baseline: measure, cache per backend setup, and apply to later measurements."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError, MeterError
from joules.measure import Meter
from joules.measure.estimate import EstimateBackend
from joules.measure.fake import FakeBackend, FakeClock
from joules.measure.idle import idle_cache_path, load_idle, measure_idle, save_idle


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
