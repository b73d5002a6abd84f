"""--dtype auto: bf16 only where the probe finds it faster; the verdict is cached per CPU/torch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import joules.runtime_dtype as rd
from joules.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    _load(monkeypatch, 0.0)  # a quiet machine unless a test says otherwise
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


# -- speed probes and the machine's load ----------------------------------------------------


def _load(monkeypatch, load_1m, own_1m=0.0, cores=2):
    monkeypatch.setattr(rd, "machine_load", lambda: rd.MachineLoad(load_1m, own_1m, cores))


def test_the_probe_keeps_the_best_time_of_its_repeats(monkeypatch):
    ticks = iter([0.0, 5.0, 10.0, 10.5, 20.0, 23.0])  # repeats of 5 s, 0.5 s, 3 s
    monkeypatch.setattr(rd, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: None)
    assert rd._time_matmul(torch.float32, repeats=3) == 0.5


def test_machine_load_reads_the_load_average_and_discounts_this_process(monkeypatch):
    monkeypatch.setattr(
        rd, "os", SimpleNamespace(getloadavg=lambda: (3.0, 2.0, 1.0), cpu_count=lambda: 4)
    )
    load = rd.machine_load()
    assert load.load_1m == 3.0 and load.own_1m >= 0
    assert rd.MachineLoad(3.0, 0.0, 4).busy  # 0.75 other threads per core
    assert not rd.MachineLoad(3.0, 2.0, 4).busy  # this process's own work is not a competitor
    assert not rd.MachineLoad(2.0, 0.0, 4).busy  # 0.5 per core: the limit itself is quiet


def test_a_probe_taken_on_a_busy_machine_is_probed_again(cache, monkeypatch):
    calls = _fake_probe(monkeypatch, 1.0, 2.0)  # busy: bf16 looked slow
    _load(monkeypatch, 1.8)
    first = rd.auto_dtype()
    assert first.name == "fp32" and first.load["busy"] and "busy" in first.reason
    calls = _fake_probe(monkeypatch, 3.0, 0.5)  # still busy, other timings: best of each kept
    second = rd.auto_dtype()
    assert len(calls) == 1 and (second.fp32_s, second.bf16_s) == (1.0, 0.5)
    assert second.name == "bf16" and "best of 2 busy probes" in second.reason
    _load(monkeypatch, 0.1)  # quiet now: a fresh probe replaces the busy ones
    calls = _fake_probe(monkeypatch, 1.0, 0.95)
    third = rd.auto_dtype()
    assert len(calls) == 1 and third.name == "fp32" and not third.load["busy"]
    assert rd.auto_dtype().reason.endswith("(cached probe; bf16 needs >= 1.10x)")
    assert len(calls) == 1  # a quiet probe is the machine's truth


def test_busy_probes_are_used_after_max_busy_probes(cache, monkeypatch):
    _load(monkeypatch, 1.8)
    calls = _fake_probe(monkeypatch, 1.0, 0.5)
    for _ in range(rd.MAX_BUSY_PROBES + 2):
        choice = rd.auto_dtype()
    assert len(calls) == rd.MAX_BUSY_PROBES and choice.load["busy"]
    assert "cached probe on a busy machine" in choice.reason


def test_a_cached_probe_without_a_load_is_probed_again(cache, monkeypatch):
    _load(monkeypatch, 0.0)
    path = cache / "dtype_probe" / f"{rd.probe_key()}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"fp32_s": 1.0, "bf16_s": 0.1, "torch": "x"}')  # written before loads
    calls = _fake_probe(monkeypatch, 1.0, 2.0)
    assert rd.auto_dtype().name == "fp32" and len(calls) == 1
