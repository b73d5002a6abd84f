"""Grid intensity lookup, PUE, WUE and embodied carbon arithmetic."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError
from joules.measure.carbon import (
    HOURS_PER_YEAR,
    CarbonConfig,
    embodied_g_per_hour,
    grid_intensity,
    hardware_table,
    match_device,
)


def test_country_and_region_lookup():
    fr = grid_intensity("FR")
    assert (fr.region, fr.name, fr.g_per_kwh) == ("FR", "France", 56.0)
    assert fr.year >= 2021 and "codecarbon" in fr.source
    assert grid_intensity("fra") == fr and grid_intensity(" fr ") == fr
    ca = grid_intensity("us-ca")
    assert ca.region == "US-CA" and "eGRID" in ca.source and ca.year == 2023
    assert grid_intensity("gcp:europe-west1").g_per_kwh > 0
    assert grid_intensity("SE3").g_per_kwh < 100
    world = grid_intensity(None)
    assert world.region == "world" and world.g_per_kwh == 475.0 and world.year == 2019
    # coal-heavy grids are dirtier than hydro/nuclear ones: a sanity check on the data
    assert grid_intensity("PL").g_per_kwh > grid_intensity("NO").g_per_kwh


def test_unknown_region_is_one_line_with_the_fix():
    with pytest.raises(ConfigError, match=r"unknown grid region 'Atlantis'.*--grid-g-per-kwh"):
        grid_intensity("Atlantis")


def test_one_kwh_in_france_with_pue_and_wue():
    r = CarbonConfig(region="FR", pue=1.5, wue_l_per_kwh=2.0, embodied=False).assess(3.6e6, 60.0)
    assert r.facility_energy_j == pytest.approx(5.4e6)
    assert r.operational_co2_g == pytest.approx(1.5 * 56.0)
    assert r.water_l == pytest.approx(2.0)  # WUE is per kWh of IT energy
    assert r.embodied_co2_g == 0.0 and r.co2_g == r.operational_co2_g
    assert CarbonConfig().assess(3.6e6, 1.0).water_l is None  # no WUE given: no water figure


def test_user_grid_value_and_env_region(monkeypatch):
    r = CarbonConfig(g_per_kwh=100.0).assess(3.6e6, 1.0)
    assert (r.region, r.operational_co2_g) == ("custom", 100.0)
    monkeypatch.setenv("JOULES_REGION", "DE")
    assert CarbonConfig().grid.region == "DE"


def test_embodied_is_amortised_per_device_hour():
    h100 = match_device("gpu", "NVIDIA H100 80GB HBM3")
    per_h = embodied_g_per_hour(h100, "gpu")
    assert per_h == pytest.approx(150_000 / (5 * HOURS_PER_YEAR))
    r = CarbonConfig(g_per_kwh=0.0).assess(0.0, 7200.0, embodied_g_per_h=per_h)
    assert r.embodied_co2_g == pytest.approx(2 * per_h) and r.co2_g == r.embodied_co2_g
    assert embodied_g_per_hour(None, "cpu", share=0.5) == pytest.approx(
        0.5 * 30_000 / (4 * HOURS_PER_YEAR)
    )


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"pue": 0.9}, "PUE must be >= 1.0"),
        ({"wue_l_per_kwh": -1}, "WUE must be >= 0"),
        ({"g_per_kwh": -5}, "grid intensity must be >= 0"),
    ],
)
def test_bad_settings(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        CarbonConfig(**kwargs)


def test_hardware_table_is_well_formed():
    t = hardware_table()
    ids = [d["id"] for d in t["devices"]]
    assert len(ids) == len(set(ids))
    for d in t["devices"]:
        assert d["kind"] in ("cpu", "gpu") and d["match"] and d["tdp_w"] > 0
        assert d["embodied_kgco2e"] > 0 and d["lifetime_years"] > 0
        assert d["source"] and d["embodied_source"]
        if d["kind"] == "cpu":
            assert 0 < d["idle_fraction"] < 1 and d["logical_cpus"] >= 1
    assert t["memory"]["w_per_gib"] > 0
    # most specific first: an H100 PCIe is not matched as SXM, an A100 SXM not as PCIe
    assert match_device("gpu", "NVIDIA H100 PCIe")["id"] == "nvidia-h100-pcie"
    assert match_device("gpu", "NVIDIA A100-SXM4-80GB")["id"] == "nvidia-a100-sxm"
    assert match_device("gpu", "Quadro K5000") is None


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("gpu", "NVIDIA L4", "nvidia-l4"),
        ("gpu", "NVIDIA L40S", None),  # was nvidia-l4: "L4" is a substring of "L40S"
        ("gpu", "NVIDIA GH200 480GB", None),  # was nvidia-h200: "H200" inside "GH200"
        ("gpu", "NVIDIA H200", "nvidia-h200"),
        ("gpu", "Tesla T4", "nvidia-t4"),
        ("gpu", "NVIDIA H100 80GB HBM3", "nvidia-h100-sxm"),
        ("gpu", "NVIDIA H100 PCIe", "nvidia-h100-pcie"),
        ("gpu", "NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm"),
        ("gpu", "NVIDIA A100 80GB PCIe", "nvidia-a100-pcie"),
        ("gpu", "NVIDIA GeForce RTX 4090", "nvidia-rtx-4090"),
        ("cpu", "AMD EPYC 7763 64-Core Processor", "amd-epyc-7763"),
        ("cpu", "AMD EPYC 7B13", "amd-epyc-generic"),
        ("cpu", "Intel(R) Xeon(R) Platinum 8480+", "intel-xeon-8480"),
        ("cpu", "12th Gen Intel(R) Core(TM) i7-12700", "intel-core-i7-12700"),
        ("cpu", "12th Gen Intel(R) Core(TM) i7-12700K", None),  # a 125 W part, not the 65 W one
    ],
)
def test_devices_match_whole_words_not_substrings(kind, name, expected):
    dev = match_device(kind, name)
    assert (dev["id"] if dev else None) == expected
