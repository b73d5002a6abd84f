"""detect_meter picks what exists and says why the rest is not used; doctor lists the meters."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from joules.cli import app
from joules.measure import detect_meter, meter_domains
from joules.testing.measure import FakeClock, FakeGpu, FakeNvml


def test_without_counters_the_estimator_runs_and_the_notes_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "none"))
    meter = detect_meter(gpus=False, interval_s=None)
    assert [(d.name, d.backend, d.method) for d in meter.domains()] == [
        ("cpu", "estimate", "estimated"),
        ("dram", "estimate", "estimated"),
    ]
    assert any(n.startswith("rapl: no powercap tree") for n in meter.notes)
    assert any("estimated (±30%)" in n for n in meter.notes)
    meter.close()


def test_meter_domains_has_doctor_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "none"))
    lib = FakeNvml([FakeGpu(), FakeGpu(counter=False)], FakeClock())
    domains, _notes = meter_domains(nvml_lib=lib)
    by = {d["domain"]: d for d in domains}
    assert by["gpu0"]["backend"] == "nvml" and by["gpu0"]["method"] == "counter"
    assert by["gpu1"]["method"] == "sampled" and "no energy counter" in by["gpu1"]["note"]
    assert by["cpu"]["method"] == "estimated"
    assert all({"domain", "backend", "method"} <= set(d) for d in domains)


def test_doctor_lists_every_meter_domain(tmp_path, monkeypatch):
    pc = tmp_path / "pc" / "intel-rapl:0"
    pc.mkdir(parents=True)
    (pc / "name").write_text("package-0")
    (pc / "energy_uj").write_text("100")
    (pc / "max_energy_range_uj").write_text("1000000")
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "pc"))
    res = CliRunner().invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    meters = {m["domain"]: m for m in json.loads(res.output)["meters"]}
    assert meters["package0"]["backend"] == "rapl" and meters["package0"]["method"] == "counter"
    assert meters["dram"]["method"] == "estimated"  # no RAPL DRAM zone: estimated beside it
    table = CliRunner().invoke(app, ["doctor"])
    assert table.exit_code == 0 and "meter package0" in table.output and "rapl" in table.output
