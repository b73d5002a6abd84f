"""`joules measure -- CMD` and `joules idle` through typer's CliRunner."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from joules.cli import app
from joules.testing.measure import FakeClock, FakeGpu, FakeNvml

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_counters(tmp_path, monkeypatch):
    """Same meters on every machine: no RAPL tree, and a fresh idle cache."""
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "no-powercap"))
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JOULES_REGION", raising=False)


def invoke(*args):
    return runner.invoke(app, list(args))


def test_json_schema_and_exit_code_pass_through():
    code = "import sys; sum(range(10**6)); sys.exit(7)"
    res = invoke(
        "measure",
        "--json",
        "--region",
        "FR",
        "--pue",
        "1.2",
        "--wue",
        "1.8",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert res.exit_code == 7, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["method"] == "estimated" and d["energy_j"] > 0 and d["duration_s"] > 0
    assert d["uncertainty_j"] == pytest.approx(0.3 * d["energy_j"])
    assert d["carbon"]["region"] == "FR" and d["carbon"]["pue"] == 1.2
    assert d["co2_g"] == pytest.approx(
        d["energy_j"] * 1.2 / 3.6e6 * 56.0 + d["carbon"]["embodied_co2_g"]
    )
    assert d["water_l"] == pytest.approx(d["energy_j"] / 3.6e6 * 1.8)
    assert set(d["domains"]) == {"cpu", "dram"}
    assert d["net_energy_j"] > 0  # the child's CPU time, above the model idle


def test_table_output_and_arguments_reach_the_command_unchanged(tmp_path):
    out = tmp_path / "m.json"
    res = invoke(
        "measure",
        "-o",
        str(out),
        "--",
        sys.executable,
        "-c",
        "import sys; print(sys.argv[1:])",
        "a b",
        "$HOME",
        "--json",
    )
    assert res.exit_code == 0, res.output
    # no shell: "$HOME" is not expanded, "a b" stays one argument, --json goes to the command
    assert "energy" in res.output and "estimated" in res.output and "CO2" in res.output
    assert json.loads(out.read_text())["method"] == "estimated"


def test_timeline_flag():
    res = invoke(
        "measure",
        "--json",
        "--timeline",
        "--interval",
        "0.02",
        "--",
        sys.executable,
        "-c",
        "import time; time.sleep(0.3)",
    )
    assert res.exit_code == 0, res.output
    tl = json.loads(res.output[res.output.index("{") :])["timeline"]
    assert len(tl["t_s"]) >= 3 and set(tl["power_w"]) == {"cpu", "dram"}


def test_killed_by_a_signal_is_128_plus_n():
    res = invoke(
        "measure",
        "--json",
        "--",
        sys.executable,
        "-c",
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    )
    assert res.exit_code == 128 + 15


@pytest.mark.parametrize(
    "args, msg",
    [
        (["measure", "--", "no-such-command-xyz"], "command not found: 'no-such-command-xyz'"),
        (["measure", "--pue", "0.5", "--", "true"], "PUE must be >= 1.0"),
        (["measure", "--region", "Atlantis", "--", "true"], "unknown grid region"),
        (["measure", "--interval", "0", "--", "true"], "--interval must be > 0"),
        (["measure", "--cpu-tdp-w", "-3", "--", "true"], "--cpu-tdp-w must be > 0"),
        (["measure", "--gpu-power-limit", "250", "--", "true"], "need an NVIDIA GPU"),
        (["idle", "--seconds", "0"], "--seconds must be > 0"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(args, msg):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert "Traceback" not in res.output


def test_not_executable(tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    res = invoke("measure", "--", str(f))
    assert res.exit_code == 2 and "not executable" in res.output


def test_gpu_power_limit_on_the_fake(monkeypatch):
    clock = FakeClock()
    lib = FakeNvml([FakeGpu(power_limit_w=700.0)], clock)
    seen = []
    real = lib.nvmlDeviceSetPowerManagementLimit

    def record(h, mw):
        seen.append(mw)
        real(h, mw)

    lib.nvmlDeviceSetPowerManagementLimit = record
    from joules.cli import measure as cli_measure
    from joules.measure import detect_meter

    monkeypatch.setattr(cli_measure, "_make_meter", lambda **kw: detect_meter(nvml_lib=lib, **kw))
    res = invoke("measure", "--json", "--gpu-power-limit", "300", "--", "true")
    assert res.exit_code == 0, res.output
    assert seen == [300_000, 700_000]  # set for the run, then restored
    assert "gpu0" in json.loads(res.output[res.output.index("{") :])["domains"]
    lib.root = False
    res = invoke("measure", "--gpu-power-limit", "300", "--", "true")
    assert res.exit_code == 2 and "needs root" in res.output


def test_idle_caches_and_measure_then_reports_net(tmp_path):
    res = invoke("idle", "--seconds", "0.3", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["total_idle_power_w"] > 0 and d["method"] == "estimated"
    assert (tmp_path / "cache" / "idle.json").is_file()
    table = invoke("idle", "--seconds", "0.2")
    assert table.exit_code == 0 and "idle power" in table.output


def test_measurement_line_for_people():
    from joules.cli.measure import measurement_line
    from joules.measure import Meter
    from joules.testing.measure import FakeBackend, FakeClock

    clock = FakeClock()
    meter = Meter(
        [FakeBackend({"cpu": 10.0}, clock=clock, method="estimated", idle_w={"cpu": 4.0})],
        clock=clock,
        interval_s=None,
    )
    with meter.window("gen") as w:
        clock.advance(2.0)
    line = measurement_line(w.measurement)
    assert line.startswith("20.000 J ± 1 J (estimated) over 2.00 s = 10.00 W, net 12.000 J")
    assert "g CO2" in line


def test_net_energy_without_idle_baseline_is_not_gross(tmp_path, monkeypatch):
    """The issue's repro: a RAPL tree, no `joules idle` run: no net figure, said in words."""
    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000\n")
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "powercap"))
    res = invoke("measure", "--json", "--", sys.executable, "-c", "pass")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert "package0" in d["domains"]
    assert d["net_energy_j"] is None  # was energy_j, with "idle_power_w": 0.0
    assert "package0" in d["uncovered_domains"]
    table = invoke("measure", "--", sys.executable, "-c", "pass")
    assert table.exit_code == 0
    assert "no idle baseline for package0" in table.output
    assert "run `joules idle`" in table.output


@pytest.mark.parametrize("child_rc", [0, 5])
def test_unwritable_output_prints_the_result_then_one_line(tmp_path, child_rc):
    bad = tmp_path / "no-such-dir" / "m.json"
    code = f"import sys; sys.exit({child_rc})"
    res = invoke("measure", "--json", "--output", str(bad), "--", sys.executable, "-c", code)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    d = json.loads(res.stdout[res.stdout.index("{") :])  # the measurement came out first
    assert d["energy_j"] >= 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "could not write --output" in err[0] and "Traceback" not in res.output
    assert res.exit_code == (child_rc or 2)


def test_output_file_gets_the_json(tmp_path):
    out = tmp_path / "m.json"
    res = invoke("measure", "--output", str(out), "--", "true")
    assert res.exit_code == 0
    assert json.loads(out.read_text())["method"] in ("counter", "sampled", "estimated")
