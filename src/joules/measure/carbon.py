"""Carbon and water of measured energy: grid intensity by region, PUE, WUE, embodied carbon.

    >>> from joules.measure.carbon import CarbonConfig, grid_intensity
    >>> grid_intensity("FR").g_per_kwh        # France, from the embedded table
    56.0
    >>> r = CarbonConfig(region="FR", pue=1.2, wue_l_per_kwh=1.8).assess(3.6e6, 3600.0)
    >>> round(r.operational_co2_g, 1), round(r.water_l, 2)   # 1 kWh of IT energy
    (67.2, 1.8)

Model (one line each):

- facility energy = IT energy (what the meter measured) x PUE (power usage effectiveness,
  >= 1: cooling and power distribution on top of the IT load; 1.0 by default = IT energy only);
- operational CO2 = facility energy (kWh) x grid intensity (g CO2-eq / kWh) of the region
  (``--region FR``, ``US-CA``, ``gcp:europe-west1``; ``$JOULES_REGION``; else the world average),
  or a value the user passes (``g_per_kwh``);
- water = IT energy (kWh) x WUE (site water usage effectiveness, litres per kWh of IT energy;
  the Green Grid's definition). No default: pass one (e.g. 1.8 L/kWh, a commonly cited US
  data-centre average) to get water;
- embodied CO2 = sum over the measured devices of (manufacturing CO2 / lifetime hours) x
  duration: the device-hours the run used of each device's life (``hardware.json``).

The grid table is trimmed from the codecarbon package's data (MIT licence; see
``joules/data/LICENSES.md``); every entry carries its year and source.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from joules.errors import ConfigError

HOURS_PER_YEAR = 8766.0  # 365.25 days


@functools.lru_cache(maxsize=1)
def _grid_table() -> dict[str, Any]:
    return json.loads(resources.files("joules.data").joinpath("grid_intensity.json").read_text())


@functools.lru_cache(maxsize=1)
def hardware_table() -> dict[str, Any]:
    """The shipped hardware table (``joules/data/hardware.json``)."""
    return json.loads(resources.files("joules.data").joinpath("hardware.json").read_text())


def name_matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` occurs in ``name`` as whole words (case-insensitive): neither end
    may touch a letter or digit, so "L4" matches "NVIDIA L4" but not "NVIDIA L40S", and
    "EPYC 7763" matches "AMD EPYC 7763 64-Core" but not "EPYC 77631"."""
    return (
        re.search(rf"(?<![a-z0-9]){re.escape(pattern.lower())}(?![a-z0-9])", name.lower())
        is not None
    )


def match_device(kind: str, name: str) -> dict[str, Any] | None:
    """The first ``hardware.json`` device of ``kind`` ("cpu"/"gpu") one of whose match strings
    occurs in ``name`` as whole words (:func:`name_matches`); entries are ordered most specific
    first. None if none match."""
    for dev in hardware_table()["devices"]:
        if dev["kind"] == kind and any(name_matches(m, name) for m in dev["match"]):
            return dev
    return None


def embodied_g_per_hour(device: dict[str, Any] | None, kind: str, share: float = 1.0) -> float:
    """Embodied grams CO2-eq per hour of use of one device (``share`` of it, e.g. a VM's vCPUs)."""
    spec = device or hardware_table()[f"{kind}_defaults"]
    return spec["embodied_kgco2e"] * 1000.0 / (spec["lifetime_years"] * HOURS_PER_YEAR) * share


@dataclass(frozen=True)
class GridIntensity:
    """Carbon intensity of one grid, with where the number comes from."""

    region: str
    name: str
    g_per_kwh: float
    year: int | None
    source: str


def grid_intensity(region: str | None = None) -> GridIntensity:
    """Grid intensity of a country (ISO alpha-2 or alpha-3, e.g. ``FR``), a region (``US-CA``,
    ``SE3``, ``gcp:europe-west1``) or the world average (``None`` or ``world``)."""
    table = _grid_table()
    countries_src = "codecarbon global energy mix table (MIT)"
    if region is None or region.strip().lower() in ("", "world"):
        w = table["world_average"]
        return GridIntensity("world", "world average", w["g_per_kwh"], w["year"], w["source"])
    key = region.strip()
    up = key.upper()
    if up in table["countries"]:
        c = table["countries"][up]
        return GridIntensity(up, c["name"], c["g_per_kwh"], c["year"], countries_src)
    for code, c in table["countries"].items():
        if c["iso3"] == up:
            return GridIntensity(code, c["name"], c["g_per_kwh"], c["year"], countries_src)
    for code, r in table["regions"].items():
        if code.lower() == key.lower():
            return GridIntensity(code, r["name"], r["g_per_kwh"], r["year"], r["source"])
    raise ConfigError(
        f"unknown grid region {region!r}: pass an ISO country code (FR, DE, US...), a US state "
        "(US-CA), a Nordic zone (SE3), a cloud region (gcp:europe-west1), or --grid-g-per-kwh"
    )


@dataclass(frozen=True)
class CarbonResult:
    """Carbon and water of one measurement, with every factor that produced them."""

    region: str
    grid_g_per_kwh: float
    grid_source: str
    grid_year: int | None
    pue: float
    wue_l_per_kwh: float | None
    facility_energy_j: float
    operational_co2_g: float
    embodied_co2_g: float
    co2_g: float
    water_l: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CarbonConfig:
    """Where and how the energy was used. ``region`` defaults to ``$JOULES_REGION`` or the world
    average; ``g_per_kwh`` overrides the table; ``embodied`` adds amortised manufacturing CO2."""

    region: str | None = None
    g_per_kwh: float | None = None
    pue: float = 1.0
    wue_l_per_kwh: float | None = None
    embodied: bool = True

    def __post_init__(self) -> None:
        if self.region is None:
            self.region = os.environ.get("JOULES_REGION") or None
        if not self.pue >= 1.0:
            raise ConfigError(f"PUE must be >= 1.0 (facility / IT energy), got {self.pue}")
        if self.wue_l_per_kwh is not None and not self.wue_l_per_kwh >= 0:
            raise ConfigError(f"WUE must be >= 0 L/kWh, got {self.wue_l_per_kwh}")
        if self.g_per_kwh is not None and not self.g_per_kwh >= 0:
            raise ConfigError(f"grid intensity must be >= 0 g/kWh, got {self.g_per_kwh}")
        self.grid = (
            GridIntensity("custom", "user value", float(self.g_per_kwh), None, "given by the user")
            if self.g_per_kwh is not None
            else grid_intensity(self.region)
        )

    def assess(
        self, energy_j: float, duration_s: float, embodied_g_per_h: float = 0.0
    ) -> CarbonResult:
        """Carbon and water of ``energy_j`` of IT energy used over ``duration_s``."""
        facility_j = energy_j * self.pue
        operational = facility_j / 3.6e6 * self.grid.g_per_kwh
        embodied = embodied_g_per_h * duration_s / 3600.0 if self.embodied else 0.0
        water = energy_j / 3.6e6 * self.wue_l_per_kwh if self.wue_l_per_kwh is not None else None
        return CarbonResult(
            region=self.grid.region,
            grid_g_per_kwh=self.grid.g_per_kwh,
            grid_source=self.grid.source,
            grid_year=self.grid.year,
            pue=self.pue,
            wue_l_per_kwh=self.wue_l_per_kwh,
            facility_energy_j=facility_j,
            operational_co2_g=operational,
            embodied_co2_g=embodied,
            co2_g=operational + embodied,
            water_l=water,
        )
