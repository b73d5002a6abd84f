"""The machine probe: small buffers here, its cache file round trip and its errors."""

from __future__ import annotations

import json

import pytest

from joules.bench.probe import MachineLimits, limits_path, load_machine_limits, probe_machine
from joules.errors import ConfigError


def test_probe_caches_by_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
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
