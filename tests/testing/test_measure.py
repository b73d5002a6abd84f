"""The scripted clock and backend behave as documented (tests elsewhere rely on them)."""

from __future__ import annotations

import pytest

from joules.testing.measure import FakeBackend, FakeClock


def test_clock_only_moves_forward():
    c = FakeClock(5.0)
    c.advance(1.5)
    assert c() == 6.5
    with pytest.raises(ValueError):
        c.advance(-1.0)


def test_power_changes_integrate_exactly():
    c = FakeClock()
    f = FakeBackend({"a": 10.0}, clock=c)
    r0 = f.read(c())
    c.advance(1.0)
    f.set_power("a", 20.0)
    c.advance(0.5)
    assert f.read(c()).energy_j["a"] - r0.energy_j["a"] == pytest.approx(20.0)
