"""Fixed-parameter quantization (``Format.fit``), hypothesis properties over every preset and a
few non-presets: fitting on w reproduces plain quantization bit for bit, column slices and single
columns agree with the whole, a perturbed weight is packed with w's parameters."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from joules import formats
from joules.errors import ConfigError

# GGUF block types take only rows of whole blocks: their fit is tested in test_gguf.py
SPECS = [
    *(s for s in formats.PRESETS if not s.startswith("gguf-")),
    "int4-g64",
    "uint4-asym-g64",
    "uint4-asym-g32-zpint",
    "int8-ch-sbf16",
    "int3-g7-s32",
    "fp8-e4m3-ch",
    "fp6-e3m2-g16-sbf16",
    "mxfp8-e4m3-g16",
    "nf4-g32-s16",
    "ternary-ch",
    "nxfp4-nm-am",
    "nxfp8-e4m3",
    "nxfp4-nm3-cr-g16",
    "codebook2-it3",
]
assert len(set(SPECS)) == len(SPECS)

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
specials = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e38])
elems = st.one_of(finite, finite, finite, specials)
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def weights(elements=finite, max_rows=5, max_cols=70):
    return (
        st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))
        .flatmap(lambda s: arrays("float32", s, elements=elements))
        .map(torch.from_numpy)
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, all NaNs made equal."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int32)


def same_parts(a: formats.QuantizedTensor, b: formats.QuantizedTensor, skip=()) -> bool:
    if a.parts.keys() != b.parts.keys():
        return False
    return all(
        a.parts[k].dtype == b.parts[k].dtype
        and torch.equal(bits(a.parts[k].float()), bits(b.parts[k].float()))
        for k in a.parts
        if k not in skip
    )


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(w=weights(elems))
def test_fit_on_w_reproduces_plain_quantization(spec, w):
    fmt = formats.get(spec)
    f = fmt.fit(w)
    q = f.quantize(w)
    assert same_parts(q, fmt.quantize(w))
    assert torch.equal(bits(fmt.dequantize(q)), bits(fmt.fake_quant(w)))
    assert torch.equal(bits(f.fake_quant_cols(w, 0)), bits(fmt.fake_quant(w)))


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(w=weights(elems), data=st.data())
def test_column_slices_and_single_columns_equal_the_whole(spec, w, data):
    f = formats.get(spec).fit(w)
    k = w.shape[1]
    whole = bits(f.fake_quant_cols(w, 0))
    cuts = sorted({*data.draw(st.lists(st.integers(1, k), max_size=4)), 0, k})
    parts = [f.fake_quant_cols(w[:, a:b], a) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(bits(torch.cat(parts, dim=1)), whole)
    cols = [f.fake_quant_cols(w[:, c : c + 1], c) for c in range(k)]  # GPTQ's column loop
    assert all(c.dtype == torch.float32 and c.shape == (w.shape[0], 1) for c in cols)
    assert torch.equal(bits(torch.cat(cols, dim=1)), whole)


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(w=weights(), data=st.data())
def test_perturbed_weight_is_packed_with_the_fitted_parameters(spec, w, data):
    fmt = formats.get(spec)
    scale = data.draw(st.sampled_from([0.5, 3.0, -1.0]))
    w2 = w * scale + torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    f = fmt.fit(w)
    q2 = f.quantize(w2)
    assert same_parts(q2, fmt.quantize(w), skip=("codes",))  # every parameter is w's
    assert torch.equal(bits(fmt.dequantize(q2)), bits(f.fake_quant_cols(w2, 0)))
    assert q2.nbytes == fmt.quantize(w2).nbytes
    # GPTQ packs the columns it rounded: re-packing rounded values must not move them (a
    # zero-scale group may turn -0 into +0)
    r2 = f.fake_quant_cols(w2, 0)
    torch.testing.assert_close(fmt.dequantize(f.quantize(r2)), r2, rtol=0, atol=0)


def test_fixed_scales_clip_larger_columns():
    fmt = formats.get("int4-g64")
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    f = fmt.fit(w)
    s = fmt._params(fmt.grouping.split(w))["scales"].float().reshape(8, 2)
    out = f.fake_quant_cols(w[:, 70:71] * 100, 70)
    assert torch.equal(out.abs(), 7 * s[:, 1:2])  # every element clips to +-7 steps of group 1
    assert torch.equal(f.fake_quant_cols(w[:, 70:71], 70), fmt.fake_quant(w)[:, 70:71])


@pytest.mark.parametrize("spec", ["int8", "int4-g64"])
def test_fit_errors_are_one_line(spec):
    fmt = formats.get(spec)
    for bad in (torch.randn(16), torch.randn(2, 3, 4)):
        with pytest.raises(ConfigError, match="2-D weight"):
            fmt.fit(bad)
    f = fmt.fit(torch.randn(4, 64))
    with pytest.raises(ConfigError, match="do not fit"):
        f.fake_quant_cols(torch.randn(4, 2), 63)
    with pytest.raises(ConfigError, match="do not fit"):
        f.fake_quant_cols(torch.randn(3, 1), 0)
    with pytest.raises(ConfigError, match="fitted on"):
        f.quantize(torch.randn(4, 32))


def test_codebook_fit_takes_kmeans_weights():
    fmt = formats.get("codebook3")
    gen = torch.Generator().manual_seed(2)
    w, sens = torch.randn(6, 40, generator=gen), torch.rand(6, 40, generator=gen)
    f = fmt.fit(w, weights=sens)
    assert same_parts(f.quantize(w), fmt.quantize(w, weights=sens))
    assert torch.equal(f.fake_quant_cols(w, 0), fmt.fake_quant(w, weights=sens))


def test_nxfp_columns_keep_each_blocks_element_choice():
    fmt = formats.get("nxfp4-am")
    gen = torch.Generator().manual_seed(3)
    # rows of different shapes pick different elements (E1M2 for flat rows, E3M0 for spiky)
    w = torch.cat([torch.rand(4, 32, generator=gen) + 1, torch.randn(4, 32, generator=gen) ** 5])
    f = fmt.fit(w)
    assert f.params["selector"].unique().numel() > 1
    for c in (0, 17, 31):
        assert torch.equal(f.fake_quant_cols(w[:, c : c + 1], c), fmt.fake_quant(w)[:, c : c + 1])
