"""The amdsmi backend on a fake amdsmi: counter ticks x resolution, and the sampled fallback."""

from __future__ import annotations

import pytest

from joules.errors import MeterError
from joules.measure import Meter
from joules.measure.amd import AmdSmiBackend, load_amdsmi
from joules.testing.measure import FakeAmdSmi, FakeClock, FakeGpu


def test_counter_and_sampled_domains():
    clock = FakeClock()
    lib = FakeAmdSmi(
        [
            FakeGpu(name="AMD Instinct MI300X", power_w=500.0),
            FakeGpu(name="AMD Radeon", power_w=50.0, counter=False),
        ],
        clock,
    )
    amd = AmdSmiBackend(lib=lib)
    assert [(d.name, d.method) for d in amd.domains()] == [
        ("amdgpu0", "counter"),
        ("amdgpu1", "sampled"),
    ]
    meter = Meter([amd], clock=clock, interval_s=None, idle_power_w=None)
    w = meter.begin("w")
    for _ in range(10):
        clock.advance(0.1)
        meter._sample()
    m = meter.end(w)
    # counter resolution is 15.3 uJ per tick: exact to a tick
    assert m.domains["amdgpu0"].energy_j == pytest.approx(500.0, abs=2 * 15.3e-6)
    assert m.domains["amdgpu1"].energy_j == pytest.approx(50.0)


def test_old_key_name_is_read():
    clock = FakeClock()
    lib = FakeAmdSmi([FakeGpu(power_w=100.0)], clock)
    real = lib.amdsmi_get_energy_count
    lib.amdsmi_get_energy_count = lambda h: {
        "power": real(h)["energy_accumulator"],
        "counter_resolution": 15.3,
    }
    assert AmdSmiBackend(lib=lib).domains()[0].method == "counter"


def test_missing_amdsmi_is_a_clear_error():
    try:
        import amdsmi  # noqa: F401
    except ImportError:
        with pytest.raises(MeterError, match="amdsmi is not installed"):
            load_amdsmi()
    else:
        pytest.skip("amdsmi is installed here")
