"""The estimator on this machine: attribution to the right processes, the model, the label."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from joules.errors import ConfigError
from joules.measure import Meter
from joules.measure.estimate import (
    ESTIMATE_RELATIVE_UNCERTAINTY,
    EstimateBackend,
    cpu_power_model,
)

# A child that burns `seconds` of its own CPU time, then prints the CPU time it used in total
# (interpreter start-up included), measured by itself: an independent check of attribution.
SPIN = (
    "import time, sys\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < float(sys.argv[1]):\n"
    "    pass\n"
    "print(time.process_time())\n"
)


def spin_self(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def meter_for(scope):
    est = EstimateBackend(scope)
    return est, Meter([est], interval_s=None)


def test_child_that_sleeps_while_parent_spins_reads_near_idle():
    est, meter = meter_for("children")
    w = meter.begin("sleeping child")
    proc = subprocess.Popen(["sleep", "1"])
    while proc.poll() is None:  # the parent spins the whole time
        pass
    m = meter.end(w)
    cpu = m.domains["cpu"]
    idle_j = est.model.idle_w * m.duration_s
    assert cpu.energy_j == pytest.approx(idle_j, abs=est.model.active_w_per_cpu * 0.05)
    assert m.net_energy_j < est.model.active_w_per_cpu * 0.05  # the parent's ~1 CPU-s is not here


def test_child_that_spins_while_parent_sleeps_reads_active_power_times_its_cpu_time():
    est, meter = meter_for("children")
    w = meter.begin("spinning child")
    out = subprocess.run(
        [sys.executable, "-c", SPIN, "0.8"], capture_output=True, text=True, check=True
    )
    m = meter.end(w)
    child_cpu_s = float(out.stdout)
    net_cpu_j = m.domains["cpu"].energy_j - est.model.idle_w * m.duration_s
    # the child's own count misses only its exit (tens of ms at most)
    assert net_cpu_j == pytest.approx(
        est.model.active_w_per_cpu * child_cpu_s, abs=est.model.active_w_per_cpu * 0.05
    )
    assert child_cpu_s >= 0.8


def test_process_scope_counts_this_process():
    est, meter = meter_for("process")
    with meter.window("self") as w:
        spin_self(0.4)
    net_cpu_j = w.measurement.domains["cpu"].energy_j - est.model.idle_w * w.measurement.duration_s
    assert net_cpu_j == pytest.approx(est.model.active_w_per_cpu * 0.4, rel=0.1)
    est_c, meter_c = meter_for("children")
    with meter_c.window("self, children scope") as w2:
        spin_self(0.3)
    net_c = w2.measurement.domains["cpu"].energy_j - est_c.model.idle_w * w2.measurement.duration_s
    assert net_c == pytest.approx(0.0, abs=1e-9)  # no children ran: nothing but idle


def test_system_scope_sees_busy_cpu():
    est = EstimateBackend("system")
    a = est.cpu_seconds()
    spin_self(0.3)
    assert est.cpu_seconds() - a >= 0.25


def test_estimated_label_and_uncertainty_band_in_json():
    est, meter = meter_for("process")
    with meter.window("json") as w:
        spin_self(0.05)
    d = json.loads(json.dumps(w.measurement.to_dict()))
    assert d["method"] == "estimated"
    assert {v["method"] for v in d["domains"].values()} == {"estimated"}
    assert d["uncertainty_j"] == pytest.approx(ESTIMATE_RELATIVE_UNCERTAINTY * d["energy_j"])
    assert d["idle_power_w"] == pytest.approx(est.model.idle_w)
    assert d["net_energy_j"] is not None
    assert any("estimated (±30%)" in n for n in d["notes"])


def test_memory_is_metered_from_resident_size():
    est = EstimateBackend("process")
    r0 = est.read(0.0)
    r1 = est.read(10.0)
    rss_gib = est.memory_gib()
    assert rss_gib > 0.01  # a Python process with pytest loaded
    assert r1.energy_j["dram"] - r0.energy_j["dram"] == pytest.approx(
        10.0 * rss_gib * 0.375, rel=0.2
    )


def test_power_model_from_the_table():
    m = cpu_power_model("AMD EPYC 7763 64-Core Processor", logical_cpus=128)
    assert m.hardware_id == "amd-epyc-7763"
    assert m.idle_w + m.active_w_per_cpu * 128 == pytest.approx(280.0)  # full load = TDP
    assert m.share == 1.0
    vm = cpu_power_model("AMD EPYC", logical_cpus=2)  # a VM that hides the model
    assert vm.hardware_id == "amd-epyc-generic"
    assert vm.idle_w == pytest.approx(280.0 * 0.3 / 128 * 2) and vm.share == pytest.approx(2 / 128)
    assert cpu_power_model("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz").hardware_id == (
        "intel-xeon-8380"
    )
    unknown = cpu_power_model("Mystery CPU 9000", logical_cpus=16)
    assert unknown.hardware_id is None and "--cpu-tdp-w" in unknown.source
    assert unknown.tdp_w == 85.0


def test_user_tdp_overrides_the_table():
    m = cpu_power_model("AMD EPYC", cpu_tdp_w=65.0, logical_cpus=8)
    assert m.active_w_per_cpu == pytest.approx(65.0 * 0.7 / 8)
    assert m.idle_w == pytest.approx(65.0 * 0.3)
    assert m.source.startswith("--cpu-tdp-w")
    with pytest.raises(ConfigError, match="--cpu-tdp-w must be > 0"):
        cpu_power_model(cpu_tdp_w=0)
    with pytest.raises(ConfigError, match="unknown estimator scope"):
        EstimateBackend("galaxy")


def test_idle_key_only_for_system_scope():
    assert EstimateBackend("process").idle_key() is None
    assert EstimateBackend("system").idle_key().startswith("estimate:system:")


def test_with_the_background_thread():
    est = EstimateBackend("process")
    meter = Meter([est], interval_s=0.02, timeline=True)
    with meter.window("threaded") as w:
        spin_self(0.2)
    meter.close()
    m = w.measurement
    assert m.energy_j > 0 and len(m.timeline.t_s) >= 2
    assert all(p >= 0 for p in m.timeline.power_w["cpu"])


@pytest.mark.parametrize("proc_children_files", [True, False])
def test_descendants_are_found_with_and_without_proc_children_files(
    monkeypatch, proc_children_files
):
    import joules.measure.estimate as estimate

    if not proc_children_files:
        monkeypatch.setattr(estimate, "_descendant_pids", lambda pid: None)  # psutil's scan
    elif estimate._descendant_pids(1) is None:
        pytest.skip("this kernel has no /proc/PID/task/TID/children")
    est = EstimateBackend("children")
    shell = subprocess.Popen(["sh", "-c", "sleep 2 & wait"])  # a child with a grandchild
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = {p.pid for p in est._descendants(precise=True)}
            if len(pids) >= 2:
                break
            time.sleep(0.02)
        assert shell.pid in pids and len(pids) >= 2
    finally:
        shell.kill()
        shell.wait()
