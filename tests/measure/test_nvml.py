"""NVML backend on a fake pynvml: counter, sampled fallback, short windows, two GPUs, resets."""

from __future__ import annotations

import itertools

import pytest

from joules.errors import MeterError
from joules.measure import Meter
from joules.measure.detect import detect_meter
from joules.measure.nvml import NvmlBackend
from joules.testing.measure import FakeClock, FakeGpu, FakeNvml


def rig(*gpus, period=0.1):
    clock = FakeClock()
    lib = FakeNvml(list(gpus), clock)
    nvml = NvmlBackend(lib=lib, counter_period_s=period)
    meter = Meter([nvml], clock=clock, interval_s=None, idle_power_w=None)
    return clock, lib, nvml, meter


def run(meter, clock, seconds, steps=10, change=None):
    """A window of ``seconds`` with ``steps`` background reads; ``change(i)`` between them."""
    w = meter.begin("w")
    for i in range(steps):
        if change:
            change(i)
        clock.advance(seconds / steps)
        meter._sample()
    return meter.end(w)


def test_counter_path():
    clock, _lib, nvml, meter = rig(FakeGpu(power_w=300.0))
    assert [(d.name, d.method, d.device) for d in nvml.domains()] == [
        ("gpu0", "counter", "NVIDIA H100 80GB HBM3")
    ]
    m = run(meter, clock, 2.0)
    d = m.domains["gpu0"]
    assert (d.method, d.backend, d.note) == ("counter", "nvml", None)
    assert d.energy_j == pytest.approx(600.0, abs=1e-3)  # the counter is in whole millijoules
    assert d.uncertainty_j == pytest.approx(max(0.05 * 600.0, 5.0 * 2.0), rel=1e-3)


def test_counter_follows_power_changes_the_sampler_would_miss():
    clock, lib, _nvml, meter = rig(FakeGpu(power_w=100.0))
    w = meter.begin("w")
    clock.advance(0.5)
    lib.set_power(0, 400.0)  # a burst between two reads
    clock.advance(0.5)
    lib.set_power(0, 100.0)
    m = meter.end(w)
    assert m.domains["gpu0"].method == "counter"
    assert m.domains["gpu0"].energy_j == pytest.approx(250.0, abs=1e-3)


def test_unsupported_counter_falls_back_to_sampling_and_says_so():
    clock, lib, nvml, meter = rig(FakeGpu(name="Tesla P100", power_w=200.0, counter=False))
    (dom,) = nvml.domains()
    assert dom.method == "sampled" and "no energy counter" in dom.note
    m = run(meter, clock, 1.0, change=lambda i: setattr(lib.gpus[0], "power_w", 200.0 + 10 * i))
    d = m.domains["gpu0"]
    assert d.method == "sampled" and m.method == "sampled"
    # trapezoid over reads at 0, .1, ..., 1.0 s of power 200, 200, 210, ..., 290 W
    powers = [200.0] + [200.0 + 10 * i for i in range(10)]
    expected = sum(0.05 * (a + b) for a, b in itertools.pairwise(powers))
    assert d.energy_j == pytest.approx(expected)
    assert d.uncertainty_j > 0.05 * d.energy_j  # discretisation bound added


def test_short_window_is_marked_and_estimated_from_power_times_time():
    clock, lib, _nvml, meter = rig(FakeGpu(power_w=250.0))
    lib.gpus[0].counter_frozen = True  # the counter has not ticked within the window
    w = meter.begin("short")
    clock.advance(0.02)
    m = meter.end(w)
    d = m.domains["gpu0"]
    assert d.method == "sampled"
    assert "shorter than the energy counter" in d.note
    assert d.energy_j == pytest.approx(250.0 * 0.02)  # not 0
    assert any("gpu0: window of 20.0 ms" in n for n in m.notes)


def test_counter_that_does_not_move_is_not_reported_as_zero():
    clock, lib, _nvml, meter = rig(FakeGpu(power_w=80.0))
    lib.gpus[0].counter_frozen = True
    m = run(meter, clock, 1.0)
    d = m.domains["gpu0"]
    assert d.method == "sampled" and "did not move" in d.note
    assert d.energy_j == pytest.approx(80.0)


def test_two_gpus_are_separate_domains():
    clock, _lib, _nvml, meter = rig(FakeGpu(power_w=300.0), FakeGpu(power_w=100.0, counter=False))
    m = run(meter, clock, 1.0)
    assert m.domains["gpu0"].method == "counter" and m.domains["gpu1"].method == "sampled"
    assert m.domains["gpu0"].energy_j == pytest.approx(300.0, abs=1e-3)
    assert m.domains["gpu1"].energy_j == pytest.approx(100.0)
    assert m.energy_j == pytest.approx(400.0, abs=1e-3)
    assert m.method == "sampled"  # the least direct domain


def test_virtual_gpu_counter_reading_zero_is_sampled():
    clock, _lib, nvml, meter = rig(FakeGpu(name="GRID A100-4C", counter_start_j=0.0))
    (dom,) = nvml.domains()
    assert dom.method == "sampled" and "reads 0" in dom.note
    m = run(meter, clock, 1.0)
    assert m.domains["gpu0"].energy_j == pytest.approx(300.0)


def test_counter_going_backwards_falls_back_for_that_window_only():
    clock, lib, _nvml, meter = rig(FakeGpu(power_w=100.0))

    def reset(i):
        if i == 5:
            lib.gpus[0].energy_j = 1.0  # driver reload / reset

    m = run(meter, clock, 1.0, change=reset)
    d = m.domains["gpu0"]
    assert d.energy_j > 0 and d.method == "sampled" and "backwards" in d.note
    assert d.energy_j == pytest.approx(100.0)
    m2 = run(meter, clock, 1.0)  # the next window is on the counter again
    assert m2.domains["gpu0"].method == "counter"
    assert m2.domains["gpu0"].energy_j == pytest.approx(100.0, abs=1e-3)


def test_power_read_failure_is_a_meter_error():
    _clock, lib, _nvml, meter = rig(FakeGpu())

    def broken(h):
        raise lib.NVMLError(999, "GPU is lost")

    lib.nvmlDeviceGetPowerUsage = broken
    with pytest.raises(MeterError, match="gpu0: NVML cannot read power"):
        meter.begin("w")


def test_bad_indices_and_no_gpus():
    clock = FakeClock()
    with pytest.raises(MeterError, match="no GPU found"):
        NvmlBackend(lib=FakeNvml([], clock))
    with pytest.raises(MeterError, match=r"no GPU \[3\]"):
        NvmlBackend([3], lib=FakeNvml([FakeGpu()], clock))
    only1 = NvmlBackend([1], lib=FakeNvml([FakeGpu(), FakeGpu(name="NVIDIA L4")], clock))
    assert [d.name for d in only1.domains()] == ["gpu1"]


def test_gpu_embodied_carbon_comes_from_the_hardware_table():
    _, _, nvml, _ = rig(FakeGpu(name="NVIDIA H100 80GB HBM3"))
    (dom,) = nvml.domains()
    assert dom.embodied_g_per_h == pytest.approx(150_000 / (5 * 8766))


def test_detect_meter_combines_gpus_and_cpu():
    clock = FakeClock()
    lib = FakeNvml([FakeGpu(), FakeGpu()], clock)
    meter = detect_meter(nvml_lib=lib, interval_s=None)
    # no RAPL tree (tests/measure/conftest.py): the CPU comes from the estimator
    assert [d.name for d in meter.domains()] == ["gpu0", "gpu1", "cpu", "dram"]
    assert meter.idle_source == "model"  # not a baseline from the host's idle cache
    meter.close()
    assert lib.shutdowns == 1
