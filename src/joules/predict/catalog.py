"""The hardware catalog of ``joules predict``: peak FLOP/s, bandwidth, memory and power, sourced.

    >>> from joules.predict.catalog import get_hardware, hardware_names
    >>> h100 = get_hardware("h100")
    >>> h100.id, h100.peak_flops["bf16"] / 1e12, h100.bandwidth_bps / 1e12
    ('nvidia-h100-sxm', 989.4, 3.35)
    >>> "this-machine" in hardware_names()
    True

One table for all of joules: ``joules/data/hardware.json`` (the energy estimator and the carbon
code read the same file). An entry with a ``perf`` block is a catalog entry; every figure names
its source (a datasheet URL or document title) and is checked at load: a missing or bad key is a
one-line :class:`~joules.errors.ConfigError` naming the entry and the key. A user's own file
(``--catalog FILE``, same ``{"devices": [...]}`` layout) adds or overrides entries.

``this-machine`` is built at load from the bench probe (``joules bench --probe``: read and triad
bandwidth, matmul FLOP/s per dtype, threads; cached under ``$JOULES_CACHE_DIR``) and the energy
estimator's watts for this CPU; where no probe has run, from the matched catalog CPU's figures
scaled by this VM's share of its logical CPUs (and said so in ``sources``). Calibrated
coefficients (``joules predict calibrate``) are attached to it when present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.measure.carbon import hardware_table, match_device
from joules.measure.estimate import cpu_power_model
from joules.paths import cache_dir
from joules.system import cpu_model

THIS_MACHINE = "this-machine"
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
_REQUIRED = {"id": str, "kind": str, "name": str, "tdp_w": (int, float), "source": str}
_PERF_REQUIRED = {
    "peak_tflops": dict,
    "vector_tflops": (int, float),
    "memory_bandwidth_gbs": (int, float),
    "default_dtype": str,
    "source": str,
}


@dataclass(frozen=True)
class HardwareSpec:
    """One machine as the roofline sees it (SI units: FLOP/s, bytes/s, bytes, watts)."""

    id: str
    name: str
    kind: str  # "cpu" | "gpu"
    peak_flops: dict[str, float]  # dense peak per compute dtype
    vector_flops: float  # non-tensor fp32 rate (dequantisation runs here)
    bandwidth_bps: float
    memory_bytes: float
    tdp_w: float
    idle_w: float
    default_dtype: str
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    embodied_kgco2e: float | None = None
    lifetime_years: float | None = None

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s of ``dtype``; a dtype the entry does not list runs at the fp32 rate
        (e.g. fp8 on an A100 is emulated through wider types), or the default dtype's."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops.get("fp32", self.peak_flops[self.default_dtype])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "peak_flops": dict(self.peak_flops),
            "vector_flops": self.vector_flops,
            "bandwidth_bps": self.bandwidth_bps,
            "memory_bytes": self.memory_bytes,
            "tdp_w": self.tdp_w,
            "idle_w": self.idle_w,
            "default_dtype": self.default_dtype,
            "aliases": list(self.aliases),
            "sources": dict(self.sources),
            "embodied_kgco2e": self.embodied_kgco2e,
            "lifetime_years": self.lifetime_years,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareSpec:
        d = dict(d)
        d["aliases"] = tuple(d.get("aliases", ()))
        return cls(**d)


def _check(d: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    for key, typ in spec.items():
        if key not in d:
            raise ConfigError(f"hardware catalog entry {where}: missing key {key!r}")
        if not isinstance(d[key], typ) or isinstance(d[key], bool):
            raise ConfigError(f"hardware catalog entry {where}: key {key!r} has a bad value")
        if isinstance(d[key], str) and not d[key].strip():
            raise ConfigError(f"hardware catalog entry {where}: key {key!r} is empty")
        if isinstance(d[key], int | float) and not d[key] > 0:
            raise ConfigError(f"hardware catalog entry {where}: key {key!r} must be > 0")


def validate_entry(d: Any, where: str = "?") -> None:
    """Raise a one-line ConfigError naming the entry and the bad key of a catalog entry."""
    if not isinstance(d, dict):
        raise ConfigError(f"hardware catalog entry {where}: not a JSON object")
    where = str(d.get("id", where))
    _check(d, _REQUIRED, where)
    if d["kind"] not in ("cpu", "gpu"):
        raise ConfigError(f"hardware catalog entry {where}: key 'kind' must be cpu or gpu")
    perf = d.get("perf")
    if not isinstance(perf, dict):
        raise ConfigError(f"hardware catalog entry {where}: missing key 'perf'")
    _check(perf, _PERF_REQUIRED, f"{where}.perf")
    peaks = perf["peak_tflops"]
    if not peaks:
        raise ConfigError(f"hardware catalog entry {where}: key 'perf.peak_tflops' is empty")
    for dt, v in peaks.items():
        if dt not in DTYPE_BYTES:
            raise ConfigError(
                f"hardware catalog entry {where}: key 'perf.peak_tflops.{dt}' is not a dtype "
                f"({', '.join(DTYPE_BYTES)})"
            )
        if not isinstance(v, int | float) or not v > 0:
            raise ConfigError(
                f"hardware catalog entry {where}: key 'perf.peak_tflops.{dt}' must be > 0"
            )
    if perf["default_dtype"] not in peaks:
        raise ConfigError(
            f"hardware catalog entry {where}: key 'perf.default_dtype' is not in perf.peak_tflops"
        )
    mem = perf.get("memory_gib", d.get("memory_gib"))
    if not isinstance(mem, int | float) or not mem > 0:
        raise ConfigError(f"hardware catalog entry {where}: missing key 'memory_gib'")
    if d["kind"] == "gpu" and not isinstance(d.get("idle_w"), int | float):
        raise ConfigError(f"hardware catalog entry {where}: missing key 'idle_w'")
    if d["kind"] == "cpu" and not isinstance(d.get("idle_fraction"), int | float):
        raise ConfigError(f"hardware catalog entry {where}: missing key 'idle_fraction'")


def _spec(d: dict[str, Any]) -> HardwareSpec:
    perf = d["perf"]
    idle = d["idle_w"] if d["kind"] == "gpu" else d["tdp_w"] * d["idle_fraction"]
    return HardwareSpec(
        id=d["id"],
        name=d["name"],
        kind=d["kind"],
        peak_flops={k: float(v) * 1e12 for k, v in perf["peak_tflops"].items()},
        vector_flops=float(perf["vector_tflops"]) * 1e12,
        bandwidth_bps=float(perf["memory_bandwidth_gbs"]) * 1e9,
        memory_bytes=float(perf.get("memory_gib", d.get("memory_gib"))) * 2**30,
        tdp_w=float(d["tdp_w"]),
        idle_w=float(idle),
        default_dtype=perf["default_dtype"],
        aliases=tuple(d.get("aliases", ())),
        sources={"performance": perf["source"], "power": d["source"]},
        embodied_kgco2e=d.get("embodied_kgco2e"),
        lifetime_years=d.get("lifetime_years"),
    )


def _entries(catalog_files: tuple[str | Path, ...]) -> list[dict[str, Any]]:
    out = [d for d in hardware_table()["devices"] if "perf" in d]
    for f in catalog_files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read hardware catalog {f}: {exc}") from exc
        devs = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devs, list):
            raise ConfigError(f'hardware catalog {f}: expected {{"devices": [ ... ]}}')
        for i, d in enumerate(devs):
            validate_entry(d, f"{f}[{i}]")
        ids = {d["id"] for d in devs}
        out = [d for d in out if d["id"] not in ids] + list(devs)
    return out


def load_catalog(catalog_files: tuple[str | Path, ...] = ()) -> dict[str, HardwareSpec]:
    """Every catalogued device by id (shipped entries, then ``catalog_files``), validated."""
    specs: dict[str, HardwareSpec] = {}
    for i, d in enumerate(_entries(tuple(catalog_files))):
        validate_entry(d, f"#{i}")
        specs[d["id"]] = _spec(d)
    return specs


def hardware_names(catalog_files: tuple[str | Path, ...] = ()) -> list[str]:
    """Names ``get_hardware`` accepts: ids, aliases and ``this-machine``."""
    names = [THIS_MACHINE]
    for s in load_catalog(catalog_files).values():
        names += [*s.aliases, s.id]
    return names


def get_hardware(name: str, catalog_files: tuple[str | Path, ...] = ()) -> HardwareSpec:
    """The spec of ``name`` (an id, an alias or ``this-machine``), or a one-line error."""
    key = name.strip().lower()
    if key == THIS_MACHINE:
        return this_machine()
    for s in load_catalog(catalog_files).values():
        if key == s.id or key in s.aliases:
            return s
    short = [THIS_MACHINE] + [
        s.aliases[0] if s.aliases else s.id for s in load_catalog(catalog_files).values()
    ]
    raise ConfigError(f"unknown hardware {name!r}: pass one of {', '.join(short)}")


# -- this machine ---------------------------------------------------------------------------


def _probe_cache_files() -> list[Path]:
    root = cache_dir()
    found = []
    for pat in ("probe*.json", "*machine_limits*.json", "bench/probe*.json", "bench/*limits*.json"):
        found += sorted(root.glob(pat))
    return found


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")}


def machine_limits() -> dict[str, Any] | None:
    """The bench probe's limits of this machine as a plain dict, or None if none was measured.

    Reads ``joules.bench.probe.load_machine_limits()``, else the probe's cache file; both are
    read defensively (key names normalised by :func:`_normalise_limits`)."""
    # lazy: bench.probe imports torch, and `joules predict` never needs it
    from joules.bench.probe import load_machine_limits

    try:
        lim = _normalise_limits(_as_dict(load_machine_limits()))
    except Exception:
        lim = None
    if lim:
        return lim
    for f in _probe_cache_files():
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in _cache_entries(data):
            lim = _normalise_limits(entry)
            if lim:
                lim["cache_file"] = str(f)
                return lim
    return None


def _cache_entries(data: Any) -> list[dict[str, Any]]:
    """Candidate limit records of a probe cache file: ``{"entries": {"<cpu>|<threads>": {...}}}``
    (this CPU and thread count first) or one flat record."""
    if not isinstance(data, dict):
        return []
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return [data]
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    want = f"{cpu_model()}|{threads}"
    mine = [v for k, v in entries.items() if k.split("|")[0] == cpu_model()]
    exact = [entries[want]] if isinstance(entries.get(want), dict) else []
    return [e for e in exact + mine if isinstance(e, dict)]


def _scaled(value: Any, key: str, unit: float) -> float | None:
    """A figure in SI units from a key that names its unit (``_bps``, ``_gbs``, ``gflops``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return None
    low = key.lower()
    if "gbs" in low or "gb_s" in low or "gbps" in low or low.endswith("_gb"):
        return float(value) * 1e9
    if "tflop" in low:
        return float(value) * 1e12
    if "gflop" in low:
        return float(value) * 1e9
    return float(value) * unit


def _normalise_limits(raw: dict[str, Any]) -> dict[str, Any] | None:
    """``{"read_bandwidth_bps", "triad_bandwidth_bps", "peak_flops": {dtype: FLOP/s},
    "threads"}`` from whatever key names the probe used; None if no bandwidth or FLOP/s."""
    if not isinstance(raw, dict):
        return None
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k not in ("peak_flops", "matmul_flops", "flops"):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    out: dict[str, Any] = {"peak_flops": {}}
    for k, v in flat.items():
        low = k.lower()
        if "bandwidth" in low or low.startswith(("read_", "triad_", "copy_")):
            bw = _scaled(v, k, 1.0)
            if bw is None:
                continue
            if "triad" in low:
                out.setdefault("triad_bandwidth_bps", bw)
            elif "read" in low or low == "bandwidth":
                out.setdefault("read_bandwidth_bps", bw)
        elif "flop" in low and isinstance(v, dict):
            for dt, x in v.items():
                f = _scaled(x, k, 1.0)
                if f and str(dt) in DTYPE_BYTES:
                    out["peak_flops"][str(dt)] = f
        elif "flop" in low:
            for dt in DTYPE_BYTES:
                if dt in low:
                    f = _scaled(v, k, 1.0)
                    if f:
                        out["peak_flops"].setdefault(dt, f)
        elif low in ("threads", "num_threads", "n_threads"):
            out["threads"] = int(v)
    bw = out.get("read_bandwidth_bps") or out.get("triad_bandwidth_bps")
    if not bw or not out["peak_flops"]:
        return None
    out["bandwidth_bps"] = bw
    return out


def this_machine() -> HardwareSpec:
    """This machine: bench-probe limits (else the catalog CPU's share) and estimator watts."""
    import psutil

    pm = cpu_power_model()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or pm.logical_cpus
    threads = min(threads, pm.logical_cpus)
    # Power: idle of the CPUs this OS sees + busy watts of the threads the run uses.
    tdp_w = pm.idle_w + pm.active_w_per_cpu * threads
    sources = {"power": f"energy estimator: {pm.source}"}
    lim = machine_limits()
    if lim:
        peaks = dict(lim["peak_flops"])
        bw = lim["bandwidth_bps"]
        where = lim.get("cache_file", "joules.bench.probe.load_machine_limits()")
        sources["performance"] = f"bench probe ({where}), measured on this machine"
    else:
        dev = match_device("cpu", pm.cpu_model)
        if dev is None or "perf" not in dev:  # an uncatalogued CPU: the generic x86 server
            dev = next(
                d for d in hardware_table()["devices"] if "x86-server" in d.get("aliases", ())
            )
        share = pm.logical_cpus / dev["logical_cpus"]
        peaks = {k: v * 1e12 * share for k, v in dev["perf"]["peak_tflops"].items()}
        bw = dev["perf"]["memory_bandwidth_gbs"] * 1e9 * share
        sources["performance"] = (
            f"no probe yet (run `joules bench --probe`): catalog {dev['id']} scaled by this OS's "
            f"share of its logical CPUs ({pm.logical_cpus}/{dev['logical_cpus']})"
        )
    default = "fp32" if "fp32" in peaks else next(iter(peaks))
    return HardwareSpec(
        id=THIS_MACHINE,
        name=f"this machine ({pm.cpu_model}, {pm.logical_cpus} logical CPUs)",
        kind="cpu",
        peak_flops=peaks,
        vector_flops=peaks.get("fp32", peaks[default]),
        bandwidth_bps=bw,
        memory_bytes=float(psutil.virtual_memory().total),
        tdp_w=tdp_w,
        idle_w=pm.idle_w,
        default_dtype=default,
        aliases=(),
        sources=sources,
    )
