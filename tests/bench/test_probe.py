"""The machine probe: small buffers here, its cache file round trip and its errors."""

from __future__ import annotations

import json

import pytest

import joules.bench.probe as probe_mod
from joules.bench.probe import (
    MachineLimits,
    limits_path,
    load_machine_limits,
    probe_machine,
    save_machine_limits,
)
from joules.errors import ConfigError
from joules.system import cpu_model


def test_probe_caches_by_threads(tmp_path, monkeypatch):
    from joules.runtime_dtype import MachineLoad

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe_mod, "machine_load", lambda: MachineLoad(0.0, 0.0, 2))  # quiet
    assert load_machine_limits(1) is None
    lim = probe_machine(1, buffer_bytes=4 << 20, matmul_n=64, repeats=2)
    assert lim.threads == 1 and lim.read_bw_bytes_s > 0 and lim.triad_bw_bytes_s > 0
    assert set(lim.peak_flops) == {"fp32", "bf16"} and min(lim.peak_flops.values()) > 0
    assert load_machine_limits(1) == lim
    assert load_machine_limits(2) is None
    data = json.loads(limits_path().read_text())
    assert data["version"] == 1 and list(data["entries"]) == [lim.key]
    assert MachineLimits.from_dict(lim.to_dict()) == lim
    assert lim.flops("bfloat16") == lim.peak_flops["bf16"]


def test_probe_rejects_bad_values():
    with pytest.raises(ConfigError, match="threads"):
        probe_machine(0, save=False)
    with pytest.raises(ConfigError, match="buffer_bytes"):
        probe_machine(1, buffer_bytes=10, save=False)


def test_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    limits_path().write_text("{not json")
    assert load_machine_limits(1) is None


def _limits(read_bw: float, busy: bool | None, probes: int = 1) -> MachineLimits:
    load = None if busy is None else {"load_1m": 3.0 if busy else 0.0, "busy": busy}
    return MachineLimits(
        cpu_model=cpu_model(),
        threads=1,
        read_bw_bytes_s=read_bw,
        triad_bw_bytes_s=read_bw,
        peak_flops={"fp32": read_bw, "bf16": read_bw / 2},
        torch="t",
        load=load,
        probes=probes,
    )


def test_the_probe_records_the_load(tmp_path, monkeypatch):
    from joules.runtime_dtype import MachineLoad

    monkeypatch.setattr(probe_mod, "machine_load", lambda: MachineLoad(5.0, 0.5, 2))
    lim = probe_machine(1, buffer_bytes=2 << 20, matmul_n=32, repeats=1, save=False)
    assert lim.load == {"load_1m": 5.0, "own_1m": 0.5, "cores": 2, "busy": True} and lim.busy


def test_a_busy_probe_is_probed_again_and_never_replaces_a_quiet_one(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    save_machine_limits(_limits(10.0, busy=True))
    assert load_machine_limits(1) is None  # busy: the next bench probes again
    assert load_machine_limits(1, accept_busy=True).read_bw_bytes_s == 10.0
    save_machine_limits(_limits(30.0, busy=True))  # busy again: best of each rate, counted
    cached = load_machine_limits(1, accept_busy=True)
    assert cached.read_bw_bytes_s == 30.0 and cached.probes == 2
    save_machine_limits(_limits(5.0, busy=True))
    cached = load_machine_limits(1)  # MAX_BUSY_PROBES busy probes: used, and says so
    assert cached is not None and cached.busy and cached.read_bw_bytes_s == 30.0
    save_machine_limits(_limits(20.0, busy=False))  # a quiet probe is the truth
    assert load_machine_limits(1).read_bw_bytes_s == 20.0
    save_machine_limits(_limits(8.0, busy=True))  # and a busy one does not replace it
    assert load_machine_limits(1).read_bw_bytes_s == 20.0
    assert not load_machine_limits(1).busy


def test_entries_without_a_load_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    save_machine_limits(_limits(10.0, busy=None))
    assert load_machine_limits(1).read_bw_bytes_s == 10.0
