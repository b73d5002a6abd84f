"""GPU power limits on the fake NVML: set, restore, sweep, and the needs-root error."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError, MeterError
from joules.measure import Meter
from joules.measure.nvml import NvmlBackend
from joules.measure.power import gpu_power_limit, power_limit_sweep
from joules.testing.measure import FakeBackend, FakeClock, FakeGpu, FakeNvml


def rig(root=True):
    clock = FakeClock()
    lib = FakeNvml([FakeGpu(power_limit_w=700.0), FakeGpu(power_limit_w=650.0)], clock, root=root)
    meter = Meter([NvmlBackend(lib=lib)], clock=clock, interval_s=None, idle_power_w=None)
    return clock, lib, meter


def test_limit_is_set_for_the_block_and_restored():
    _clock, lib, meter = rig()
    with gpu_power_limit(meter, 300.0) as original:
        assert original == {0: 700.0, 1: 650.0}
        assert [g.power_limit_w for g in lib.gpus] == [300.0, 300.0]
    assert [g.power_limit_w for g in lib.gpus] == [700.0, 650.0]
    with pytest.raises(RuntimeError), gpu_power_limit(meter, 250.0, gpus=[1]):
        assert lib.gpus[1].power_limit_w == 250.0 and lib.gpus[0].power_limit_w == 700.0
        raise RuntimeError("crash")
    assert lib.gpus[1].power_limit_w == 650.0  # restored on error too


def test_sweep_measures_each_limit():
    clock, lib, meter = rig()

    def work():
        # a power-capped GPU draws at most its limit
        for g in lib.gpus:
            g.power_w = min(400.0, g.power_limit_w)
        clock.advance(1.0)
        return "done"

    points = power_limit_sweep(work, [200.0, 300.0, 500.0], meter)
    assert [p.limit_w for p in points] == [200.0, 300.0, 500.0]
    assert [p.measurement.energy_j for p in points] == pytest.approx(
        [400.0, 600.0, 800.0], abs=1e-2
    )
    assert points[0].result == "done" and "measurement" in points[0].to_dict()
    assert [g.power_limit_w for g in lib.gpus] == [700.0, 650.0]


def test_needs_root():
    _, _, meter = rig(root=False)
    with pytest.raises(MeterError, match="needs root"), gpu_power_limit(meter, 300.0):
        pass


def test_out_of_range_limit():
    _, _, meter = rig()
    with (
        pytest.raises(ConfigError, match="outside what it accepts: 200-700 W"),
        gpu_power_limit(meter, 50.0),
    ):
        pass


def test_needs_an_nvidia_gpu():
    clock = FakeClock()
    meter = Meter([FakeBackend({"cpu": 1.0}, clock=clock)], clock=clock, interval_s=None)
    with pytest.raises(ConfigError, match="need an NVIDIA GPU"), gpu_power_limit(meter, 300.0):
        pass
    with pytest.raises(ConfigError, match="at least one limit"):
        power_limit_sweep(lambda: None, [], meter)
