"""RAPL on a fake powercap tree: exact energy across many wraps, and every failure mode."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joules.errors import MeterError
from joules.measure import Meter
from joules.measure.detect import detect_meter
from joules.measure.rapl import RaplBackend, powercap_root
from joules.testing.measure import FakeClock

RANGE_UJ = 262_143_328_850  # a real max_energy_range_uj (about 262 kJ)


class FakePowercap:
    """A powercap tree whose counters hold true energy modulo max_energy_range_uj."""

    def __init__(self, root: Path, zones: dict[str, str], range_uj: int = RANGE_UJ):
        self.root = root
        self.range_uj = range_uj
        self.true_uj = {}
        for zone, name in zones.items():
            d = root / zone
            d.mkdir(parents=True)
            (d / "name").write_text(name + "\n")
            (d / "max_energy_range_uj").write_text(f"{range_uj}\n")
            self.true_uj[zone] = 123_456_789 % range_uj
            self._write(zone)

    def _write(self, zone):
        (self.root / zone / "energy_uj").write_text(f"{self.true_uj[zone] % self.range_uj}\n")

    def add(self, zone, uj):
        self.true_uj[zone] += uj
        self._write(zone)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "powercap"))
    return FakePowercap(
        tmp_path / "powercap",
        {
            "intel-rapl:0": "package-0",
            "intel-rapl:0:0": "core",
            "intel-rapl:0:1": "dram",
            "intel-rapl:1": "package-1",
        },
    )


def test_domains_and_totals(tree):
    rapl = RaplBackend()
    doms = {d.name: d for d in rapl.domains()}
    assert list(doms) == ["package0", "package0.core", "package0.dram", "package1"]
    assert all(d.method == "counter" and d.backend == "rapl" for d in doms.values())
    assert not doms["package0.core"].in_total  # part of package0
    assert doms["package0.dram"].in_total and doms["package1"].in_total


def test_exact_to_one_microjoule_across_many_wraps(tree):
    rapl = RaplBackend()
    start = rapl.read(0.0)
    start_uj = rapl.total_uj()
    added = 0
    step = int(RANGE_UJ * 0.7) + 13  # < one range per read: one read per wrap period
    for _ in range(12):
        tree.add("intel-rapl:0", step)
        tree.add("intel-rapl:1", 7)
        added += step
        rapl.read(1.0)
    zone = next(z for z in rapl.zones if z.domain == "package0")
    assert zone.wraps >= 7
    assert rapl.total_uj()["package0"] - start_uj["package0"] == added  # integers: exact
    assert rapl.total_uj()["package1"] - start_uj["package1"] == 12 * 7
    end = rapl.read(2.0)
    assert end.energy_j["package0"] - start.energy_j["package0"] == pytest.approx(
        added * 1e-6, abs=1e-6
    )


def test_meter_window_over_a_wrapping_counter(tree):
    clock = FakeClock()
    rapl = RaplBackend()
    meter = Meter([rapl], clock=clock, interval_s=None, idle_power_w=None)
    w = meter.begin("w")
    for _ in range(5):  # the meter's background reads, one per step
        tree.add("intel-rapl:0", RANGE_UJ // 2 + 1)
        tree.add("intel-rapl:0:1", 1_000_000)
        clock.advance(1.0)
        meter._sample()
    m = meter.end(w)
    assert m.domains["package0"].energy_j == pytest.approx(5 * (RANGE_UJ // 2 + 1) * 1e-6, abs=1e-6)
    assert m.energy_j == pytest.approx(5 * (RANGE_UJ // 2 + 1) * 1e-6 + 5.0, abs=1e-6)
    assert m.method == "counter"


def test_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "x"))
    assert powercap_root() == tmp_path / "x"
    monkeypatch.delenv("JOULES_POWERCAP_ROOT")
    assert powercap_root() == Path("/sys/class/powercap")


def test_missing_tree_is_a_clear_error(tmp_path):
    with pytest.raises(MeterError, match=r"no powercap tree at .*JOULES_POWERCAP_ROOT"):
        RaplBackend(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeterError, match="no intel-rapl"):
        RaplBackend(tmp_path / "empty")


def test_permission_denied_names_the_fix(tree, monkeypatch):
    # Tests run as root, so chmod cannot deny: make open() refuse the energy files instead.
    real_open = builtins.open

    def deny(path, *a, **k):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(MeterError, match=r"permission denied .*chmod a\+r") as exc:
        RaplBackend()
    assert "\n" not in str(exc.value)


def test_directory_in_place_of_a_file(tree):
    f = tree.root / "intel-rapl:1" / "energy_uj"
    f.unlink()
    f.mkdir()
    with pytest.raises(MeterError, match=r"cannot read .*energy_uj"):
        RaplBackend()


def test_non_numeric_counter(tree):
    (tree.root / "intel-rapl:0" / "energy_uj").write_text("n/a\n")
    with pytest.raises(MeterError, match="not a number of microjoules"):
        RaplBackend()


def test_error_in_the_middle_of_a_run(tree):
    rapl = RaplBackend()
    (tree.root / "intel-rapl:0" / "energy_uj").write_text("garbage")
    with pytest.raises(MeterError, match="not a number"):
        rapl.read(1.0)


def test_psys_only_counts_when_there_is_no_package(tmp_path):
    FakePowercap(tmp_path / "a", {"intel-rapl:0": "package-0", "intel-rapl:1": "psys"})
    doms = {d.name: d.in_total for d in RaplBackend(tmp_path / "a").domains()}
    assert doms == {"package0": True, "psys": False}
    FakePowercap(tmp_path / "b", {"intel-rapl:0": "psys"})
    assert [d.in_total for d in RaplBackend(tmp_path / "b").domains()] == [True]


def test_detect_uses_rapl_and_estimates_missing_dram(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "pc"))
    FakePowercap(tmp_path / "pc", {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core"})
    meter = detect_meter(gpus=False, interval_s=None, idle_power_w=None)
    methods = {d.name: (d.backend, d.method) for d in meter.domains()}
    assert methods == {
        "package0": ("rapl", "counter"),
        "package0.core": ("rapl", "counter"),
        "dram": ("estimate", "estimated"),
    }
    meter.close()


def test_detect_falls_back_to_the_estimator_and_says_why(tree, monkeypatch):
    (tree.root / "intel-rapl:0" / "energy_uj").write_text("bad")
    meter = detect_meter(gpus=False, interval_s=None, idle_power_w=None)
    assert {d.backend for d in meter.domains()} == {"estimate"}
    assert any(n.startswith("rapl:") and "not a number" in n for n in meter.notes)
    with pytest.raises(MeterError, match="not a number"):
        detect_meter(gpus=False, cpu="rapl")
    meter.close()


@settings(max_examples=60, deadline=None)
@given(
    range_uj=st.integers(min_value=1_000, max_value=2**40),
    fractions=st.lists(st.floats(min_value=0.0, max_value=0.999), min_size=1, max_size=40),
)
def test_property_any_steps_below_one_range_sum_exactly(tmp_path_factory, range_uj, fractions):
    root = tmp_path_factory.mktemp("pc")
    tree = FakePowercap(root, {"intel-rapl:0": "package-0"}, range_uj=range_uj)
    rapl = RaplBackend(root)
    added = 0
    for f in fractions:
        step = int(f * range_uj)
        tree.add("intel-rapl:0", step)
        added += step
        rapl.read(0.0)
    assert rapl.total_uj()["package0"] == added
