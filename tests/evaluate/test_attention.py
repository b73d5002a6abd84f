"""Attention stability: every implementation is exact at fp64, and low precision deviates more."""

from __future__ import annotations

import pytest
import torch

from joules.errors import ConfigError
from joules.evaluate.attention import (
    attention_deviation,
    flash_style_attention,
    parse_dtype,
    standard_attention,
)


def test_every_implementation_at_fp64_deviates_at_most_1e_12():
    r = attention_deviation(seq_lens=[96, 130], dtypes=["fp64"], block_sizes=[32, 64], heads=2)
    impls = {row.impl for row in r.rows}
    assert {"standard", "flash-style", "flash-style-lowacc", "sdpa-math"} <= impls
    for row in r.rows:
        assert row.max_abs_dev <= 1e-12, row


def test_flash_style_handles_ragged_blocks_exactly():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref = standard_attention(q, k, v)
    for bs in (1, 16, 50, 128):
        assert torch.allclose(flash_style_attention(q, k, v, bs), ref, atol=1e-13, rtol=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ref, sdpa, atol=1e-13, rtol=0)  # causal masking agrees with torch


def test_lower_precision_deviates_more_and_ratios_are_reported():
    r = attention_deviation(seq_lens=[128], dtypes=["fp32", "bf16"], block_sizes=[64], heads=2)

    def dev(impl, dtype):
        return next(x.mean_abs_dev for x in r.rows if x.impl == impl and x.dtype == dtype)

    for impl in ("standard", "flash-style"):
        assert 0 < dev(impl, "fp32") < 1e-5 < dev(impl, "bf16") < 0.05
    (ratio,) = r.ratios("bf16")
    assert ratio["seq_len"] == 128 and ratio["mean_ratio"] == pytest.approx(
        dev("flash-style", "bf16") / dev("standard", "bf16")
    )
    assert r.to_dict()["ratios_bf16"] == [ratio]


def test_bad_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype"):
        parse_dtype("fp7")
    with pytest.raises(ConfigError, match="impl"):
        attention_deviation(seq_lens=[8], dtypes=["fp32"], impls=["magic"])
    with pytest.raises(ConfigError, match="seq_lens"):
        attention_deviation(seq_lens=[0])


def test_emulated_format_matches_the_native_dtype_it_emulates():
    def bf16(t):
        return t.to(torch.bfloat16).to(t.dtype)

    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 2, 100, 32, generator=g) for _ in range(3)]
    q, k, v = (t.to(torch.bfloat16) for t in base)
    qe, ke, ve = (bf16(t) for t in base)
    native = flash_style_attention(q, k, v, 32).float()
    emulated = flash_style_attention(qe, ke, ve, 32, rnd=bf16)
    assert torch.equal(native, emulated)  # flash-style rounds only P and the output
    std_native = standard_attention(q, k, v).float()
    std_emulated = standard_attention(qe, ke, ve, rnd=bf16)
    assert torch.allclose(std_native, std_emulated, atol=2e-2)  # matmul accumulation order differs
    r = attention_deviation(
        seq_lens=[64], dtypes=[], block_sizes=[32], heads=1, formats={"bf16": bf16}
    )
    assert {(x.impl, x.dtype) for x in r.rows} == {
        ("standard", "bf16 (emulated)"),
        ("flash-style", "bf16 (emulated)"),
    }


@pytest.mark.parametrize("low", [False, True])
def test_flash_style_keeps_its_running_state_on_the_input_device(low):
    """On the meta device (no GPU here) every tensor must follow q: a CPU-side running max/sum/
    accumulator would fail to mix with the input's device, as it would on CUDA."""
    q, k, v = (torch.empty(1, 2, 100, 16, dtype=torch.bfloat16, device="meta") for _ in range(3))
    out = flash_style_attention(q, k, v, block_size=32, low_precision_accumulators=low)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == torch.bfloat16
