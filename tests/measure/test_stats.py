"""t quantiles, summaries and measure_repeated on a scripted meter."""

from __future__ import annotations

import math
import statistics

import pytest

from joules.errors import ConfigError
from joules.measure import Meter, measure_repeated, summarize
from joules.measure.stats import t_quantile_975
from joules.testing.measure import FakeBackend, FakeClock


def test_t_quantiles_match_tables():
    assert t_quantile_975(1) == 12.706
    assert t_quantile_975(9) == 2.262
    assert t_quantile_975(30) == 2.042
    assert t_quantile_975(40) == pytest.approx(2.021)
    assert 2.000 < t_quantile_975(50) < 2.021
    assert t_quantile_975(10**9) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ConfigError):
        t_quantile_975(0)


def test_summary_matches_the_textbook_formula():
    xs = [3.1, 2.9, 3.4, 3.0, 3.6, 2.8]
    s = summarize(xs)
    sd = statistics.stdev(xs)
    half = 2.571 * sd / math.sqrt(6)
    assert (s.n, s.mean, s.std) == (6, pytest.approx(statistics.mean(xs)), pytest.approx(sd))
    assert (s.ci95_low, s.ci95_high) == (pytest.approx(s.mean - half), pytest.approx(s.mean + half))
    one = summarize([5.0])
    assert (one.std, one.ci95_low, one.ci95_high) == (0.0, 5.0, 5.0)
    with pytest.raises(ConfigError):
        summarize([])


def test_measure_repeated_on_a_scripted_meter():
    clock = FakeClock()
    fake = FakeBackend({"gpu0": 100.0}, clock=clock, idle_w={"gpu0": 10.0})
    meter = Meter([fake], clock=clock, interval_s=None)
    durations = iter([9.0, 1.0, 2.0, 3.0])  # the first call is the warm-up
    calls = []

    def work():
        calls.append(1)
        clock.advance(next(durations))
        return len(calls)

    r = measure_repeated(work, repeats=3, meter=meter, warmup=1)
    assert len(calls) == 4 and r.results == [2, 3, 4]
    assert [m.energy_j for m in r.measurements] == [100.0, 200.0, 300.0]
    assert r.energy_j.mean == 200.0 and r.energy_j.std == pytest.approx(100.0)
    assert r.energy_j.ci95_half_width == pytest.approx(4.303 * 100.0 / math.sqrt(3))
    assert r.net_energy_j.mean == pytest.approx(180.0)
    assert r.avg_power_w.std == pytest.approx(0.0) and r.method == "counter"
    assert r.to_dict()["energy_j"]["n"] == 3
    with pytest.raises(ConfigError):
        measure_repeated(work, repeats=0, meter=meter)


def test_measure_repeated_with_the_detected_meter():
    r = measure_repeated(lambda: sum(range(10_000)), repeats=2, warmup=0)
    assert r.energy_j.n == 2 and r.method in ("counter", "sampled", "estimated")
