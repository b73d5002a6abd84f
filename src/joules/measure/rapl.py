"""CPU package, core, uncore and DRAM energy from Linux powercap RAPL counters.

    >>> from joules.measure.rapl import RaplBackend
    >>> rapl = RaplBackend()                    # doctest: +SKIP
    >>> [d.name for d in rapl.domains()]        # doctest: +SKIP
    ['package0', 'package0.core', 'package0.dram', 'package1', ...]

Intel CPUs (and AMD Zen CPUs, through the same ``intel-rapl`` driver) expose each package as
``/sys/class/powercap/intel-rapl:N`` and its sub-domains as ``intel-rapl:N:M``; each zone has a
``name``, an ``energy_uj`` counter in microjoules and ``max_energy_range_uj``, the value at which
the counter wraps to 0. Energy is kept as an exact integer of microjoules: every read adds the
difference to the previous read, plus the range when the counter wrapped. That is exact across
any number of wraps as long as one read falls in each wrap period (minutes at full load); the
meter's 10 Hz reader thread guarantees that while a window is open.

The root is ``$JOULES_POWERCAP_ROOT`` (tests and containers point it at a copy) or
``/sys/class/powercap``. Since 2020 (CVE-2020-8694) the ``energy_uj`` files are readable by root
only: the error says how to allow reading them.

Totals: packages and DRAM add up; core and uncore are parts of their package, and ``psys``
(platform) contains the packages, so those are reported but not added to the total.

Uncertainty: ±5 %. Since Haswell, RAPL package energy is measured rather than modelled and
tracks external power measurements within a few percent (Khan et al., "RAPL in Action", 2018).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from joules.errors import MeterError
from joules.measure.base import Backend, DomainInfo, Reading

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_CHMOD_FIX = (
    "run as root, or allow reading the counters: "
    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*/*/energy_uj`"
)


def powercap_root() -> Path:
    """``$JOULES_POWERCAP_ROOT`` or ``/sys/class/powercap``."""
    return Path(os.environ.get("JOULES_POWERCAP_ROOT") or DEFAULT_POWERCAP_ROOT)


def _read_int(path: Path) -> int:
    """An integer from a sysfs file, or a one-line MeterError saying what is wrong and the fix."""
    try:
        with open(path) as f:
            raw = f.read().strip()
    except PermissionError as exc:
        raise MeterError(f"permission denied reading {path}: {_CHMOD_FIX}") from exc
    except FileNotFoundError as exc:
        raise MeterError(
            f"{path} is missing: the RAPL zone vanished or the tree is partial"
        ) from exc
    except OSError as exc:  # IsADirectoryError, EIO from a broken driver...
        raise MeterError(
            f"cannot read {path} ({exc.strerror or exc}): check the powercap driver"
        ) from exc
    try:
        return int(raw)
    except ValueError as exc:
        raise MeterError(
            f"{path} holds {raw[:40]!r}, not a number of microjoules: the powercap driver is "
            "broken or JOULES_POWERCAP_ROOT points at the wrong tree"
        ) from exc


@dataclass
class _Zone:
    domain: str  # "package0", "package0.dram"
    kind: str  # the zone's `name` file: "package-0", "core", "uncore", "dram", "psys"
    energy_path: Path
    range_uj: int
    in_total: bool
    last_raw_uj: int = 0
    total_uj: int = 0  # exact cumulative microjoules since the backend started
    wraps: int = 0


class RaplBackend(Backend):
    """Every RAPL zone under the powercap root, one domain each, method ``counter``."""

    name = "rapl"

    def __init__(self, root: str | Path | None = None) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else powercap_root()
        self.zones = self._discover()
        for z in self.zones:  # first read: checks permissions now, not in the middle of a run
            z.last_raw_uj = _read_int(z.energy_path)

    def _discover(self) -> list[_Zone]:
        if not self.root.is_dir():
            raise MeterError(
                f"no powercap tree at {self.root}: this kernel or VM exposes no RAPL counters "
                "(set JOULES_POWERCAP_ROOT if it lives elsewhere; joules estimates CPU energy)"
            )
        found = []
        for entry in sorted(self.root.iterdir(), key=lambda p: _zone_sort_key(p.name)):
            m = _ZONE_RE.match(entry.name)
            if not m:
                continue
            pkg, sub = int(m.group(1)), m.group(2)
            name_file = entry / "name"
            kind = name_file.read_text().strip() if name_file.is_file() else "package"
            if sub is None:
                domain = "psys" if kind == "psys" else f"package{pkg}"
                in_total = kind != "psys"
            else:
                domain = f"package{pkg}.{kind}"
                in_total = kind == "dram"  # core/uncore are inside the package's energy
            found.append(
                _Zone(
                    domain=domain,
                    kind=kind,
                    energy_path=entry / "energy_uj",
                    range_uj=_read_int(entry / "max_energy_range_uj"),
                    in_total=in_total,
                )
            )
        if not found:
            raise MeterError(
                f"no intel-rapl:* zones under {self.root}: RAPL is not exposed here "
                "(load the intel_rapl_common module, or set JOULES_POWERCAP_ROOT)"
            )
        if not any(z.in_total for z in found):  # only psys: then it is the total
            for z in found:
                z.in_total = z.kind == "psys"
        domains = [z.domain for z in found]
        if len(set(domains)) != len(domains):
            raise MeterError(f"duplicate RAPL zone names under {self.root}: {domains}")
        return found

    def domains(self) -> list[DomainInfo]:
        return [
            DomainInfo(z.domain, self.name, "counter", f"RAPL {z.kind}", in_total=z.in_total)
            for z in self.zones
        ]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        for z in self.zones:
            raw = _read_int(z.energy_path)
            delta = raw - z.last_raw_uj
            if delta < 0:  # wrapped past max_energy_range_uj back to 0
                delta += z.range_uj
                z.wraps += 1
            z.total_uj += delta
            z.last_raw_uj = raw
        return Reading(t_s, {z.domain: z.total_uj * 1e-6 for z in self.zones})

    def total_uj(self) -> dict[str, int]:
        """Exact cumulative microjoules per domain at the last read (integers, for tests)."""
        return {z.domain: z.total_uj for z in self.zones}


def _zone_sort_key(name: str) -> tuple[int, int, str]:
    m = _ZONE_RE.match(name)
    if not m:
        return (1 << 30, 0, name)
    return (int(m.group(1)), int(m.group(2) or -1), name)
