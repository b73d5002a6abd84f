"""run_bench on a scripted runtime, fake meter and fake clock: every figure is exact arithmetic."""

from __future__ import annotations

import pytest
import torch

from joules.bench import BenchConfig, BenchResult, MachineLimits, run_bench
from joules.bench import runtimes as rts
from joules.bench.runner import bench_prompts, check_workload
from joules.compress.modules.linear import linear_paths
from joules.errors import ConfigError
from joules.measure import Meter
from joules.testing.measure import FakeBackend, FakeClock

PREFILL_S, STEP_S = 0.5, 0.1
PREFILL_W, DECODE_W = 100.0, 40.0


class _Scripted(rts.Runtime):
    """Prefill takes PREFILL_S at PREFILL_W, each decode step STEP_S at DECODE_W (fake time)."""

    clock: FakeClock
    backend: FakeBackend

    def prefill(self, ids):
        self.backend.set_power("cpu", PREFILL_W)
        self.clock.advance(PREFILL_S)
        self.backend.set_power("cpu", DECODE_W)
        return ids[:, -1] % 7, 0

    def decode_step(self, token, state):
        self.clock.advance(STEP_S)
        return (token + 1) % 7, state + 1


@pytest.fixture
def scripted():
    clock = FakeClock()
    backend = FakeBackend({"cpu": DECODE_W}, clock=clock, method="estimated")
    meter = Meter([backend], clock=clock, interval_s=None, idle_power_w=None)
    _Scripted.clock, _Scripted.backend = clock, backend
    rts.register_runtime("scripted-test")(_Scripted)
    yield meter
    rts.RUNTIMES.unregister("scripted-test")


def _limits() -> MachineLimits:
    return MachineLimits("test cpu", 1, 10e9, 12e9, {"fp32": 50e9, "bf16": 5e9})


def test_joules_per_token_and_times_are_exact(tiny, scripted):
    model, tok, info = tiny
    cfg = BenchConfig(
        prompt_lens=(16, 32), gen_len=9, batch_sizes=(1, 2), repeats=3, runtime="scripted-test"
    )
    calls = []
    res = run_bench(
        model,
        tok,
        info,
        cfg,
        meter=scripted,
        progress=lambda d, t: calls.append((d, t)),
        limits=_limits(),
    )
    assert calls[-1] == (16, 16) and len(calls) == 16  # 4 rows × (1 warm-up + 3 repeats)
    assert [(r.prompt_len, r.batch) for r in res.rows] == [(16, 1), (16, 2), (32, 1), (32, 2)]
    for r in res.rows:
        assert r.ttft_s.median == pytest.approx(PREFILL_S, abs=1e-9)
        assert r.ttft_s.ci95_low == pytest.approx(PREFILL_S, abs=1e-9)
        assert r.tpot_s.median == pytest.approx(STEP_S, abs=1e-9)
        assert r.tpot_p50_s == pytest.approx(STEP_S) and r.tpot_p90_s == pytest.approx(STEP_S)
        assert r.prefill_tok_s == pytest.approx(r.batch * r.prompt_len / PREFILL_S)
        assert r.decode_tok_s == pytest.approx(r.batch / STEP_S)
        pe, de = r.prefill_energy, r.decode_energy
        assert pe.energy_j == pytest.approx([PREFILL_W * PREFILL_S] * 3)
        assert de.energy_j == pytest.approx([DECODE_W * STEP_S * 8] * 3)
        assert pe.j_per_token == pytest.approx(PREFILL_W * PREFILL_S / (r.batch * r.prompt_len))
        assert de.j_per_token == pytest.approx(DECODE_W * STEP_S / r.batch)
        assert pe.avg_power_w == pytest.approx(PREFILL_W)
        assert de.avg_power_w == pytest.approx(DECODE_W)
        assert de.method == "estimated" and de.methods == {"cpu": "estimated"}
        # The phase windows add up to the outer window of each run.
        for i, whole in enumerate(r.run_energy_j):
            assert pe.energy_j[i] + de.energy_j[i] == pytest.approx(whole, rel=1e-12)
        assert r.tokens[0] == int(bench_prompts(tok, r.prompt_len, 1)[0, -1]) % 7
        assert len(r.tokens) == 9
        # Speed of light from the given limits (the model cost is exercised in test_roofline).
        assert r.decode_sol_fraction == pytest.approx(r.decode_tok_s / r.decode_sol_tok_s)
        assert r.prefill_sol_fraction == pytest.approx(r.prefill_tok_s / r.prefill_sol_tok_s)
    back = BenchResult.from_dict(res.to_dict())
    assert back.to_dict() == res.to_dict()
    assert res.linear_paths == {"dense": 15}  # 2 layers × 7 projections + lm_head


def test_without_energy_no_meter_is_used(tiny):
    model, tok, info = tiny
    cfg = BenchConfig(prompt_lens=(8,), gen_len=3, repeats=2, energy=False)
    res = run_bench(model, tok, info, cfg, probe_if_missing=False, limits=_limits())
    r = res.rows[0]
    assert r.decode_energy is None and r.prefill_energy is None and res.meter == []
    assert r.peak_rss_bytes > 0 and r.kv_bytes == 2 * 2 * 2 * 16 * (8 + 3) * 4


def test_prompts_are_distinct_wikitext_slices(tiny):
    _, tok, _ = tiny
    ids = bench_prompts(tok, 32, 3, seed=1)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert not torch.equal(ids[0], ids[1])
    assert torch.equal(ids, bench_prompts(tok, 32, 3, seed=1))


def test_workload_checks_are_one_line(tiny):
    info = tiny.info
    with pytest.raises(ConfigError, match="exceeds the model's context of 2048"):
        check_workload(info, BenchConfig(prompt_lens=(2000,), gen_len=64))
    with pytest.raises(ConfigError, match="GiB is available"):
        check_workload(info, BenchConfig(batch_sizes=(64,)), available_bytes=1 << 20)
    with pytest.raises(ConfigError, match="positive"):
        check_workload(info, BenchConfig(prompt_lens=(0,)))
    with pytest.raises(ConfigError, match="unknown runtime"):
        check_workload(info, BenchConfig(runtime="nope"))
    check_workload(info, BenchConfig(prompt_lens=(128,), batch_sizes=(4,)))


def test_linear_paths_reads_compressed_layers(tiny):
    class Fake(torch.nn.Module):
        def __init__(self, path):
            super().__init__()
            self.path = path

    m = torch.nn.Sequential(
        Fake("kernel:int8pack"), Fake("kernel:int8pack"), Fake("emulated"), torch.nn.Linear(2, 2)
    )
    assert linear_paths(m, dense=True) == {"kernel:int8pack": 2, "emulated": 1, "dense": 1}
    assert linear_paths(m) == {"kernel:int8pack": 2, "emulated": 1}


def test_compressed_model_reports_paths_and_stored_bytes():
    from joules.compress import compress, set_kernels
    from joules.models import tiny_model

    model, tok, info = tiny_model("llama", seed=0)
    cm = compress(model, "rtn(format=int4-g32)")
    cfg = BenchConfig(prompt_lens=(8,), gen_len=3, repeats=1, energy=False)
    res = run_bench(cm.model, tok, info, cfg, limits=_limits())
    # int4-g32 has a real CPU kernel: every compressed linear names it; the head stays dense.
    (kernel,) = [p for p in res.linear_paths if p != "dense"]
    assert kernel.startswith("kernel:cpu-int4/") and res.linear_paths == {kernel: 14, "dense": 1}
    # the result's compute dtype is the one the kernels ran in (decided before the runs)
    assert res.compute_dtype == kernel.rsplit("/", 1)[1]
    assert res.rows[0].model_bytes == cm.manifest.model_bytes
    set_kernels(cm.model, False)
    emulated = run_bench(cm.model, tok, info, cfg, limits=_limits())
    assert emulated.linear_paths == {"emulated": 14, "dense": 1}
    set_kernels(cm.model, True)
    # Decode streams the packed weights, not an fp32 copy: fewer bytes, a higher speed of light.
    dense_model = tiny_model("llama", seed=0).model  # compress changed `model` in place
    dense = run_bench(dense_model, tok, info, cfg, limits=_limits())
    assert res.cost["streamed_bytes"] < dense.cost["streamed_bytes"]
    assert res.rows[0].decode_sol_tok_s > dense.rows[0].decode_sol_tok_s


def test_runtime_cache_reuses_prepared_runtimes(tiny, scripted):
    model, tok, info = tiny
    prepared = []
    _Scripted.prepare = lambda self, ids: prepared.append(ids.shape)
    try:
        cfg = BenchConfig(prompt_lens=(8,), gen_len=3, repeats=1, runtime="scripted-test")
        cache: dict = {}
        for _ in range(2):
            run_bench(model, tok, info, cfg, meter=scripted, limits=_limits(), runtime_cache=cache)
        assert prepared == [(1, 8)] and len(cache) == 1
    finally:
        del _Scripted.prepare
