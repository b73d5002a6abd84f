"""OCP minifloats: exhaustive code tables, bit-exact agreement with torch's float8 casts on a dense
grid, RNE ties, saturation and NaN/Inf handling."""

from __future__ import annotations

import math

import pytest
import torch

from joules import formats
from joules.formats.minifloat import ELEMENTS


def spec_value(code: int, e_bits: int, m_bits: int, bias: int) -> float:
    """OCP formula, written independently of the implementation."""
    sign = -1.0 if code & (1 << (e_bits + m_bits)) else 1.0
    e = (code >> m_bits) & ((1 << e_bits) - 1)
    m = code & ((1 << m_bits) - 1)
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - m_bits)
    return sign * (2**m_bits + m) * 2.0 ** (e - bias - m_bits)


def test_fp4_code_table_is_the_spec_list():
    lut = ELEMENTS["e2m1"].lut().tolist()
    assert lut[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert lut[8:] == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert math.copysign(1.0, lut[8]) == -1.0  # code 0b1000 is negative zero


@pytest.mark.parametrize(
    "name,e,m,bias,maxv",
    [
        ("e2m1", 2, 1, 1, 6.0),
        ("e2m3", 2, 3, 1, 7.5),
        ("e3m2", 3, 2, 3, 28.0),
        ("e1m2", 1, 2, 0, 3.5),
        ("e3m0", 3, 0, 3, 16.0),
    ],
)
def test_small_float_code_tables_exhaustive(name, e, m, bias, maxv):
    el = ELEMENTS[name]
    lut = el.lut().tolist()
    assert len(lut) == 2 ** (1 + e + m)
    for code, v in enumerate(lut):
        assert v == spec_value(code, e, m, bias), (name, code)
    assert max(lut) == maxv == el.max_normal  # no Inf/NaN codes: every code is finite


def test_fp8_code_tables_exhaustive_and_equal_torch():
    for name, dt, bias in [("e4m3", torch.float8_e4m3fn, 7), ("e5m2", torch.float8_e5m2, 15)]:
        el = ELEMENTS[name]
        lut = el.lut()
        ref = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dt).float()
        assert torch.equal(torch.isnan(lut), torch.isnan(ref))
        ok = ~torch.isnan(ref)
        assert torch.equal(lut[ok], ref[ok])
        for code in range(256):
            v = lut[code].item()
            if math.isfinite(v):
                assert v == spec_value(code, el.ebits, el.mbits, bias)
    e4 = ELEMENTS["e4m3"].lut()
    assert e4[0x7E] == 448 and torch.isnan(e4[0x7F]) and torch.isnan(e4[0xFF])
    assert int(torch.isnan(e4).sum()) == 2  # only S.1111.111
    e5 = ELEMENTS["e5m2"].lut()
    assert e5[0x7B] == 57344 and e5[0x7C] == math.inf and e5[0xFC] == -math.inf
    assert int(torch.isnan(e5).sum()) == 6


def dense_grid(el) -> torch.Tensor:
    """Every representable value, every midpoint, their fp32 neighbours, and 200k log-uniform
    samples, over the finite range, both signs."""
    vals = el.lut()
    pos = vals[torch.isfinite(vals) & (vals >= 0)].unique()
    mids = (pos[1:] + pos[:-1]) / 2
    pts = torch.cat([pos, mids])
    pts = torch.cat(
        [pts, torch.nextafter(pts, torch.tensor(math.inf)), torch.nextafter(pts, torch.tensor(0.0))]
    )
    g = torch.Generator().manual_seed(0)
    lo = math.log2(pos[1].item()) - 2
    samples = torch.exp2(torch.empty(200_000).uniform_(lo, math.log2(el.max_normal), generator=g))
    pts = torch.cat([pts, samples]).clamp(max=el.max_normal)
    return torch.cat([pts, -pts])


@pytest.mark.parametrize("name,dt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_arithmetic_rounding_equals_torch_float8_cast_bit_for_bit(name, dt):
    el = ELEMENTS[name]
    x = dense_grid(el)
    ours, codes = el.round_encode(x, codes=True)
    ref = x.to(dt)
    assert torch.equal(codes, ref.view(torch.uint8))  # same codes, signs of zero included
    assert torch.equal(ours.view(torch.int32), ref.float().view(torch.int32))
    assert torch.equal(el.encode(ours), codes)


def test_beyond_range_we_saturate_and_document_torch():
    x = torch.tensor([500.0, 1e6, math.inf, -math.inf])
    assert formats.get("fp8-e4m3-raw").fake_quant(x).tolist() == [448.0, 448.0, 448.0, -448.0]
    # torch 2.13's e4m3fn cast saturates the same way (Inf included)
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0, 448.0, -448.0]
    y = torch.tensor([61440.0, 1e6, math.inf])
    assert formats.get("fp8-e5m2-raw").fake_quant(y).tolist() == [57344.0, 57344.0, math.inf]
    # ...whereas torch's e5m2 cast rounds finite overflow up to Inf
    assert y.to(torch.float8_e5m2).float().tolist() == [math.inf, math.inf, math.inf]


def test_rne_ties_and_saturation_fp4():
    fq = formats.get("fp4-e2m1-raw").fake_quant
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -5.0, -0.25])
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert fq(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -4.0, -0.0]


def test_nan_handling():
    nan = float("nan")
    assert math.isnan(formats.get("fp8-e4m3-raw").fake_quant(torch.tensor([nan])).item())
    assert formats.get("fp4-e2m1-raw").fake_quant(torch.tensor([nan])).item() == 0.0  # no NaN code
    y = formats.get("fp8-e4m3-g4").fake_quant(
        torch.tensor([1.0, nan, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0])
    )
    assert torch.isnan(y[:4]).all() and torch.isfinite(y[4:]).all()  # NaN poisons its group only


def test_scaled_minifloat_maps_amax_to_max_normal():
    x = torch.tensor([[0.1, -3.0, 0.7, 1.2]])
    y = formats.get("fp8-e4m3").fake_quant(x)
    assert y[0, 1] == -3.0  # the absmax element is exact
    assert formats.get("fp8-e4m3").clip_mask(x).sum() == 0
