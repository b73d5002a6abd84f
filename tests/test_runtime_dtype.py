"""--dtype auto: bf16 only where the probe finds it faster; the verdict is cached per CPU/torch."""

from __future__ import annotations

import pytest
import torch

import joules.runtime_dtype as rd
from joules.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    return tmp_path


def _fake_probe(monkeypatch, fp32_s, bf16_s):
    calls = []

    def probe(repeats=7):
        calls.append(1)
        return fp32_s, bf16_s

    monkeypatch.setattr(rd, "probe", probe)
    return calls


def test_auto_picks_bf16_only_when_the_probe_finds_it_faster(cache, monkeypatch):
    _fake_probe(monkeypatch, 1.0, 0.5)
    assert rd.resolve_dtype("auto").dtype is torch.bfloat16
    _fake_probe(monkeypatch, 1.0, 6.0)  # AVX2-only: emulated bf16, 6x slower
    assert rd.auto_dtype(refresh=True).dtype is torch.float32
    _fake_probe(monkeypatch, 1.0, 0.95)  # a 5 % gain is below the margin
    choice = rd.auto_dtype(refresh=True)
    assert choice.name == "fp32" and "1.05x" in choice.reason


def test_the_verdict_is_cached_per_cpu_and_torch_version(cache, monkeypatch):
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    assert rd.auto_dtype().name == "bf16" and len(calls) == 1
    assert rd.auto_dtype().name == "bf16" and len(calls) == 1  # read from the cache
    assert "cached" in rd.auto_dtype().reason
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: probe again
    rd.auto_dtype()
    assert len(calls) == 2
    monkeypatch.setattr(rd, "cpu_flags", lambda: ["avx512_bf16"])  # another CPU: probe again
    rd.auto_dtype()
    assert len(calls) == 3
    assert len(list((cache / "dtype_probe").glob("*.json"))) == 3


def test_explicit_dtypes_and_bad_names():
    assert rd.resolve_dtype("fp32").dtype is torch.float32
    assert rd.resolve_dtype("bf16").reason == "requested"
    with pytest.raises(ConfigError, match="--dtype must be one of auto, fp32, bf16"):
        rd.resolve_dtype("fp8")


def test_the_real_probe_times_both_dtypes():
    fp32_s, bf16_s = rd.probe(repeats=1)
    assert fp32_s > 0 and bf16_s > 0
