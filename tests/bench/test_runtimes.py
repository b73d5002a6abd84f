"""Runtimes: eager equals transformers' generate token for token; compiled equals eager."""

from __future__ import annotations

import pytest
import torch

from joules.bench import BenchConfig, MachineLimits, run_bench
from joules.bench.runner import bench_prompts
from joules.bench.runtimes import get_runtime, runtime_names
from joules.errors import ConfigError
from joules.models import tiny_model


def _generate(model, ids, n):
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]


def test_registry():
    assert {"eager", "compiled", "llamacpp"} <= set(runtime_names())
    with pytest.raises(ConfigError, match="unknown runtime 'vllm'"):
        get_runtime("vllm")


def test_eager_equals_generate(tiny):
    model, tok, _ = tiny
    ids = bench_prompts(tok, 24, 2, seed=3)
    rt = get_runtime("eager")(model, batch=2, max_len=24 + 12)
    assert torch.equal(rt.generate(ids, 12), _generate(model, ids, 12))


@pytest.mark.slow
def test_compiled_equals_eager_and_benches():
    """Compiles a one-layer model (seconds with inductor's on-disk cache warm, ~1 min cold)."""
    model, tok, info = tiny_model("llama", seed=1, layers=1)
    ids = bench_prompts(tok, 16, 1, seed=0)
    eager = get_runtime("eager")(model, batch=1, max_len=16 + 8).generate(ids, 8)
    rt = get_runtime("compiled")(model, batch=1, max_len=16 + 8)
    rt.prepare(ids)
    for _ in range(2):  # the static cache is reset between runs
        rt.reset()
        assert torch.equal(rt.generate(ids, 8), eager)
    with pytest.raises(ConfigError, match="built for batch 1"):
        rt.prefill(torch.zeros(2, 16, dtype=torch.long))
    lim = MachineLimits("test cpu", torch.get_num_threads(), 10e9, 10e9, {"fp32": 1e10})
    cfg = BenchConfig(prompt_lens=(16,), gen_len=8, repeats=2, runtime="compiled", energy=False)
    res = run_bench(model, tok, info, cfg, limits=lim)
    assert res.runtime == "compiled" and res.rows[0].tokens == eager[0].tolist()
    assert res.rows[0].decode_sol_fraction > 0
