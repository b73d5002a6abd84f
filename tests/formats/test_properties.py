"""Hypothesis properties over every preset format: fake_quant == dequantize(quantize()) bit for
bit (specials included), idempotence, sign symmetry, representable values as fixed points and
error <= half a step in range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from joules import formats
from joules.formats.minifloat import ELEMENTS

# GGUF block types take only rows of whole blocks and finite values: tests/formats/test_gguf.py
PRESETS = [f.name for f in formats.list() if f.family != "gguf"]
# Not idempotent, by design of their scale or codebook choice (documented in their modules):
# absmean ternary re-scales its own output; NanoMantissa picks the smallest scale that fits the
# block max, and a max that rounded down to a lower element value then fits a finer scale;
# Lloyd's k-means from quantile starts can land on a different local optimum.
NOT_IDEMPOTENT = ("ternary", "nxfp4", "nxfp4-nm", "codebook")
IDEMPOTENT = [
    s for s in PRESETS if not s.startswith(NOT_IDEMPOTENT) or s == "nxfp4-am" or s == "nxfp4-cr"
]
# NF4's levels are asymmetric (8 positive, 7 negative), asymmetric ints have offsets, k-means
# codebooks and recycled codes (+ only) are not sign-symmetric either.
SYMMETRIC = [
    s
    for s in PRESETS
    if not (s.startswith(("uint", "nf4", "codebook")) or s in ("nxfp4", "nxfp4-cr"))
]

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
specials = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e38])
elems = st.one_of(finite, finite, finite, specials)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, all NaNs made equal."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int32)


def tensors(elements=finite, max_rows=4, max_cols=70):
    return (
        st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))
        .flatmap(lambda s: arrays("float32", s, elements=elements))
        .map(torch.from_numpy)
    )


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("spec", PRESETS)
@SETTINGS
@given(x=tensors(elems))
def test_fake_quant_equals_dequantize_quantize_bit_for_bit(spec, x):
    fmt = formats.get(spec)
    assert torch.equal(bits(fmt.fake_quant(x)), bits(fmt.dequantize(fmt.quantize(x))))


@pytest.mark.parametrize("spec", IDEMPOTENT)
@SETTINGS
@given(x=tensors())
def test_idempotent(spec, x):
    fmt = formats.get(spec)
    once = fmt.fake_quant(x)
    assert torch.equal(fmt.fake_quant(once), once)


@pytest.mark.parametrize("spec", SYMMETRIC)
@SETTINGS
@given(x=tensors())
def test_sign_symmetry(spec, x):
    fmt = formats.get(spec)
    assert torch.equal(fmt.fake_quant(-x), -fmt.fake_quant(x))


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"])
def test_every_code_value_is_a_fixed_point_of_the_raw_cast(name):
    el = ELEMENTS[name]
    vals = el.lut()
    vals = vals[torch.isfinite(vals)]
    fmt = formats.get(f"fp{el.bits}-{name}-raw")
    assert torch.equal(bits(fmt.fake_quant(vals)), bits(vals))


@pytest.mark.parametrize(
    "spec", ["int4-g32", "int8-ch", "uint4-asym-g32", "nf4", "mxfp4", "mxint8", "ternary"]
)
def test_grid_values_are_fixed_points(spec):
    # a tensor already on the format's grid (its own output) decodes to itself, and values drawn
    # from that grid in any order and multiplicity keep their group parameters
    fmt = formats.get(spec)
    y = fmt.fake_quant(torch.randn(8, 256, generator=torch.Generator().manual_seed(3)))
    if spec != "ternary":
        assert torch.equal(fmt.fake_quant(y), y)
    else:  # ternary: exact on tensors whose nonzeros are all +-scale and mean|x| = scale
        z = torch.tensor([1.5, -1.5, 1.5, -1.5])
        assert torch.equal(fmt.fake_quant(z), z)


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"])
@settings(max_examples=40, deadline=None)
@given(v=st.floats(0, 1, allow_nan=False))
def test_minifloat_error_at_most_half_a_step(name, v):
    el = ELEMENTS[name]
    x = torch.tensor([v * el.max_normal], dtype=torch.float32)
    r = el.round(x).item()
    a = x.item()
    e = max(math.floor(math.log2(a)) if a > 0 else el.emin, el.emin)
    step = 2.0 ** (e - el.mbits)
    assert abs(r - a) <= step / 2


# "in range": magnitudes the fp16 scales resolve (a scale below fp16's range rounds to 0)
in_range = st.one_of(
    st.just(0.0), st.floats(0.0009765625, 1e4, width=32), st.floats(-1e4, -0.0009765625, width=32)
)


@pytest.mark.parametrize("spec", ["int4-g32", "int8", "uint4-asym-g32", "int2-g64"])
@SETTINGS
@given(x=tensors(in_range))
def test_integer_error_at_most_half_a_step(spec, x):
    fmt = formats.get(spec)
    g = fmt.cfg.grouping.split(x)
    s = fmt._params(g)["scales"].float()
    err = (fmt.cfg.grouping.split(fmt.fake_quant(x)) - g).abs()
    clipped = fmt.cfg.grouping.split(fmt.clip_mask(x).float()).bool()
    # half a step, plus the float rounding of x / s and of the decode, plus (asym) the fp16
    # rounding of the stored group minimum
    tol = s / 2 * (1 + 1e-5) + g.abs() * 2e-7 + 1e-30
    if not fmt.cfg.symmetric:
        tol = tol + g.amin(dim=1, keepdim=True).abs() * 2.0**-11
    assert ((err <= tol) | clipped).all()
