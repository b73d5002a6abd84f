"""Shared fixtures of the predict tests: tiny shapes and a synthetic machine."""

from __future__ import annotations

import pytest

from joules.predict.catalog import HardwareSpec
from joules.predict.shape import ModelShape


@pytest.fixture
def tiny_shape() -> ModelShape:
    # 1 layer, hidden 8, 2 heads of 4, 1 KV head, MLP 16 (gated), vocab 32
    return ModelShape("hand", "llama", 1, 8, 2, 1, 4, 16, 32)


@pytest.fixture
def small_shape() -> ModelShape:
    return ModelShape("small", "llama", 4, 256, 8, 2, 32, 768, 1000)


def synthetic_hw(flops: float = 1e10, bw: float = 1e9, **kw) -> HardwareSpec:
    """A made-up machine with round figures (no datasheet: tests only)."""
    args = dict(
        id="synthetic",
        name="synthetic",
        kind="cpu",
        peak_flops={"fp32": flops, "bf16": 2 * flops, "int8": 4 * flops},
        vector_flops=flops,
        bandwidth_bps=bw,
        memory_bytes=2**34,
        tdp_w=100.0,
        idle_w=10.0,
        default_dtype="fp32",
    )
    args.update(kw)
    return HardwareSpec(**args)
