"""An honest estimate of CPU and memory energy where no counter exists (VMs, containers, Macs).

    >>> from joules.measure import Meter
    >>> from joules.measure.estimate import EstimateBackend
    >>> est = EstimateBackend(scope="process")          # this process and its children
    >>> meter = Meter([est], interval_s=None)
    >>> with meter.window("work") as w:
    ...     _ = sum(i * i for i in range(200_000))
    >>> w.measurement.method
    'estimated'

Model, per window of duration T (seconds):

    cpu energy  = idle_w x T  +  active_w_per_cpu x (CPU seconds used in the window)
    dram energy = w_per_gib x (GiB resident, integrated over the window)

- CPU seconds come from psutil/``os.times``: ``scope="process"`` counts this process and all
  its descendants (live ones plus those already reaped), ``"children"`` only the descendants
  (what ``joules measure -- CMD`` uses), ``"system"`` every CPU's busy time (user, nice,
  system, irq, softirq; not idle, iowait or time stolen by the hypervisor).
- The watts come from ``joules/data/hardware.json``, matched on the CPU's model name, or from
  ``cpu_tdp_w``: the table's TDP is spread over the logical CPUs it describes, with
  ``idle_fraction`` (30 % for servers) of it drawn at idle and the rest in proportion to busy
  CPU time. ``idle_w`` is the idle share of the logical CPUs this OS sees, so in a VM with 2
  vCPUs of a 128-thread host it is 2/128 of the host package's idle power.
- Memory: 0.375 W per GiB resident (3 W per 8 GB, codecarbon's RAM model).

Uncertainty: ±30 % of the estimate. Why so wide: real package power at the same CPU time varies
with instruction mix (vector units draw far more than scalar code), clock frequency and turbo
state, SMT (two busy threads on one core draw much less than twice one), and in a VM the host
model and its other tenants are unknown; TDP is a thermal rating, not a measurement. Published
comparisons of TDP-based estimators against RAPL and wall meters find errors of this order. The
band is a stated judgement, not a statistical guarantee: use a counter (RAPL, NVML) to do better.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

from joules.errors import ConfigError
from joules.measure.base import Backend, DomainInfo, Reading
from joules.measure.carbon import embodied_g_per_hour, hardware_table, match_device
from joules.system import cpu_model as detect_cpu_model

SCOPES = ("process", "children", "system")
ESTIMATE_RELATIVE_UNCERTAINTY = 0.30
# How often background reads rescan the process tree (a scan reads /proc/*/stat: ~2 ms with
# 100 processes): often just after a window opens, when a command's children appear, then 1 Hz.
_RESCAN_FAST_S, _RESCAN_S, _FAST_PHASE_S = 0.2, 1.0, 2.0


@dataclass(frozen=True)
class CpuPowerModel:
    """Watts of the estimator for one machine; see the module docstring for the model."""

    cpu_model: str
    tdp_w: float  # of the CPU(s) the source describes
    reference_logical_cpus: int  # logical CPUs that tdp_w is spread over
    idle_fraction: float
    logical_cpus: int  # logical CPUs this OS sees
    mem_w_per_gib: float
    source: str
    hardware_id: str | None = None

    @property
    def active_w_per_cpu(self) -> float:
        """Extra watts per busy logical CPU (per CPU-second per second)."""
        return self.tdp_w * (1.0 - self.idle_fraction) / self.reference_logical_cpus

    @property
    def idle_w(self) -> float:
        """Idle watts of the logical CPUs this OS sees."""
        return self.tdp_w * self.idle_fraction / self.reference_logical_cpus * self.logical_cpus

    @property
    def share(self) -> float:
        """Fraction of the described CPU(s) this OS sees (a VM's vCPUs of its host)."""
        return min(1.0, self.logical_cpus / self.reference_logical_cpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_model": self.cpu_model,
            "tdp_w": self.tdp_w,
            "reference_logical_cpus": self.reference_logical_cpus,
            "idle_fraction": self.idle_fraction,
            "logical_cpus": self.logical_cpus,
            "active_w_per_cpu": self.active_w_per_cpu,
            "idle_w": self.idle_w,
            "mem_w_per_gib": self.mem_w_per_gib,
            "source": self.source,
            "hardware_id": self.hardware_id,
        }


def cpu_power_model(
    cpu_model: str | None = None, cpu_tdp_w: float | None = None, logical_cpus: int | None = None
) -> CpuPowerModel:
    """The estimator's watts for this machine (or the named CPU / given TDP)."""
    name = cpu_model or detect_cpu_model()
    n = logical_cpus or os.cpu_count() or 1
    table = hardware_table()
    mem = table["memory"]["w_per_gib"]
    if cpu_tdp_w is not None:
        if not cpu_tdp_w > 0:
            raise ConfigError(f"--cpu-tdp-w must be > 0 W, got {cpu_tdp_w}")
        idle = table["cpu_defaults"]["idle_fraction"]
        return CpuPowerModel(name, float(cpu_tdp_w), n, idle, n, mem, "--cpu-tdp-w (user value)")
    dev = match_device("cpu", name)
    if dev is not None:
        return CpuPowerModel(
            name,
            dev["tdp_w"],
            dev["logical_cpus"],
            dev["idle_fraction"],
            n,
            mem,
            f"hardware.json {dev['id']}: {dev['source']}",
            dev["id"],
        )
    d = table["cpu_defaults"]
    return CpuPowerModel(
        name,
        d["tdp_w"],
        d["logical_cpus"],
        d["idle_fraction"],
        n,
        mem,
        f"hardware.json cpu_defaults (CPU {name!r} not in the table; pass --cpu-tdp-w)",
    )


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _descendant_pids(pid: int) -> list[int] | None:
    """Every descendant of ``pid`` from /proc/PID/task/TID/children (Linux >= 3.5, ~15 µs for a
    small tree), or None where that file does not exist (then psutil scans all of /proc, ~2 ms)."""
    if not _HAS_CHILDREN_FILES:
        return None
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:  # exited since its parent listed it
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:  # the thread exited
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _proc_cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class EstimateBackend(Backend):
    """Domains ``cpu`` and ``dram``, method ``estimated``, ±30 %."""

    name = "estimate"
    relative_uncertainty = ESTIMATE_RELATIVE_UNCERTAINTY

    def __init__(
        self,
        scope: str = "process",
        *,
        model: CpuPowerModel | None = None,
        cpu_tdp_w: float | None = None,
    ) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ConfigError(f"unknown estimator scope {scope!r}: use one of {', '.join(SCOPES)}")
        self.scope = scope
        self.model = model or cpu_power_model(cpu_tdp_w=cpu_tdp_w)
        self._me = psutil.Process()
        self._desc: list[psutil.Process] = []
        self._scanned_s = -1e18
        self._precise_s = -1e18
        self._t0: float | None = None
        self._cpu0 = 0.0
        self._dram_j = 0.0
        self._last_mem_w: float | None = None
        self._last_t: float | None = None
        self.notes.append(
            f"CPU and memory energy are estimated (±{ESTIMATE_RELATIVE_UNCERTAINTY:.0%}): "
            f"CPU time x {self.model.active_w_per_cpu:.2f} W per busy logical CPU + "
            f"{self.model.idle_w:.2f} W idle ({self.model.source}); no RAPL counters were read"
        )

    # -- what is counted ----------------------------------------------------------------------
    def _descendants(self, precise: bool) -> list[psutil.Process]:
        now = time.monotonic()
        if precise:
            self._precise_s = now
        period = _RESCAN_FAST_S if now - self._precise_s < _FAST_PHASE_S else _RESCAN_S
        if precise or now - self._scanned_s > period:
            pids = _descendant_pids(self._me.pid)
            if pids is None:  # no /proc/PID/task/TID/children: psutil scans every process
                try:
                    self._desc = self._me.children(recursive=True)
                except psutil.Error:
                    self._desc = []
            else:
                known = {p.pid: p for p in self._desc}
                self._desc = [p for pid in pids if (p := known.get(pid) or _process(pid))]
            self._scanned_s = now
        return self._desc

    def cpu_seconds(self, precise: bool = True) -> float:
        """Busy CPU seconds so far in this backend's scope (monotonic except for tree changes)."""
        if self.scope == "system":
            t = psutil.cpu_times()
            total = sum(t)
            # guest time is already inside user time on Linux; idle, iowait and steal are not ours
            for f in ("idle", "iowait", "steal", "guest", "guest_nice"):
                total -= getattr(t, f, 0.0)
            return total
        mine = os.times()
        total = mine.children_user + mine.children_system  # descendants already reaped
        if self.scope == "process":
            total += mine.user + mine.system
        for p in self._descendants(precise):
            try:
                total += _proc_cpu_s(p)
            except psutil.Error:  # exited between the scan and now: counted once reaped
                continue
        return total

    def memory_gib(self) -> float:
        """Resident memory in scope (GiB): the process tree's RSS, or the system's used memory."""
        if self.scope == "system":
            return psutil.virtual_memory().used / 2**30
        rss = self._me.memory_info().rss if self.scope == "process" else 0
        for p in self._desc:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        return rss / 2**30

    # -- Backend ------------------------------------------------------------------------------
    def domains(self) -> list[DomainInfo]:
        dev = None
        if self.model.hardware_id:
            dev = next(d for d in hardware_table()["devices"] if d["id"] == self.model.hardware_id)
        return [
            DomainInfo(
                "cpu",
                self.name,
                "estimated",
                self.model.cpu_model,
                embodied_g_per_h=embodied_g_per_hour(dev, "cpu", self.model.share),
                note=f"scope={self.scope}; {self.model.source}",
            ),
            DomainInfo("dram", self.name, "estimated", "memory", note="0.375 W/GiB resident"),
        ]

    def read(self, t_s: float, *, precise: bool = False) -> Reading:
        cpu_s = self.cpu_seconds(precise)
        mem_w = self.memory_gib() * self.model.mem_w_per_gib
        if self._t0 is None:
            self._t0, self._cpu0 = t_s, cpu_s
        if self._last_t is not None and self._last_mem_w is not None:
            self._dram_j += 0.5 * (mem_w + self._last_mem_w) * max(t_s - self._last_t, 0.0)
        self._last_t, self._last_mem_w = t_s, mem_w
        cpu_j = self.model.idle_w * (t_s - self._t0) + self.model.active_w_per_cpu * (
            cpu_s - self._cpu0
        )
        return Reading(t_s, {"cpu": cpu_j, "dram": self._dram_j}, {"cpu_s": cpu_s - self._cpu0})

    def model_idle_power_w(self) -> dict[str, float]:
        return {"cpu": self.model.idle_w, "dram": 0.0}

    def idle_key(self) -> str | None:
        # Only a whole-system estimate has a machine idle worth caching (background load);
        # process scopes use the model idle, which a cached system figure would not match.
        if self.scope != "system":
            return None
        return f"estimate:system:{self.model.cpu_model}:{self.model.tdp_w:g}"
