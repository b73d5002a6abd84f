"""OCP MX: hand-computed blocks and bit-exact agreement with torchao's MX cast."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from joules import formats
from joules.formats.packing import unpack


def block(*head: float, fill: float = 0.0) -> torch.Tensor:
    x = torch.full((1, 32), fill)
    x[0, : len(head)] = torch.tensor(head)
    return x


def test_outlier_block_flushes_the_rest():
    # amax 100: floor(log2 100) = 6, X = 2**(6 - 2) = 16; 100/16 = 6.25 saturates to 6 -> 96;
    # 1/16 = 0.0625 is below half the smallest subnormal (0.25): -> 0.
    x = block(100.0, fill=1.0)
    fmt = formats.get("mxfp4")
    q = fmt.quantize(x)
    assert q.parts["scales"].tolist() == [127 + 4]
    y = fmt.fake_quant(x)
    assert y[0, 0] == 96.0 and (y[0, 1:] == 0).all()
    assert fmt.clip_mask(x)[0, 0] and fmt.clip_mask(x).sum() == 1


def test_all_zero_block():
    x = torch.zeros(1, 32)
    for spec in ["mxfp4", "mxfp8-e4m3", "mxint8"]:
        fmt = formats.get(spec)
        q = fmt.quantize(x)
        assert q.parts["scales"].tolist() == [0]  # 2**-127, the smallest E8M0 scale
        assert (unpack(q.parts["codes"], fmt.elem_bits, 32) == 0).all()
        assert torch.equal(fmt.dequantize(q), x)


def test_subnormal_elements():
    # amax 4 -> X = 1; 0.25 ties between 0 and 0.5 -> 0 (even); 0.3 -> 0.5; 0.7 -> 0.5; 0.8 -> 1
    x = block(4.0, 0.25, 0.3, 0.7, 0.8, -0.3)
    y = formats.get("mxfp4").fake_quant(x)
    assert y[0, :6].tolist() == [4.0, 0.0, 0.5, 0.5, 1.0, -0.5]


def test_fp32_subnormal_block():
    # amax 2**-130: exponent clamps at -127; as E4M3, 2**-130 / 2**-127 = 2**-3 is exact
    x = block(2.0**-130)
    fmt = formats.get("mxfp8-e4m3")
    assert fmt.quantize(x).parts["scales"].tolist() == [0]
    assert fmt.fake_quant(x)[0, 0].item() == 2.0**-130
    assert formats.get("mxfp4").fake_quant(x)[0, 0].item() == 0.0  # 0.125 < 0.25


def test_saturation_and_scale_rule():
    # amax 7.9: floor(log2 7.9) = 2, X = 1 -> 7.9 saturates to 6 (the floor rule's known clip)
    y = formats.get("mxfp4").fake_quant(block(7.9, 3.1))
    assert y[0, :2].tolist() == [6.0, 3.0]
    # E4M3: amax 500 -> X = 2**(8 - 8) = 1, 500 saturates to 448
    assert formats.get("mxfp8-e4m3").fake_quant(block(500.0))[0, 0] == 448.0


def test_mxint8_hand_block():
    # amax 1.5 -> X = 2**0; q = round(64 v): 96, -19.2 -> -19, 0.64 -> 1
    y = formats.get("mxint8").fake_quant(block(1.5, -0.3, 0.01))
    assert y[0, :3].tolist() == [1.5, -19 / 64, 1 / 64]
    codes = formats.get("mxint8").quantize(block(1.5, -0.3)).parts["codes"][:2]
    assert codes.view(torch.int8).tolist() == [96, -19]


def test_nan_and_inf_blocks_decode_to_nan():
    x = torch.ones(2, 32)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    fmt = formats.get("mxfp4")
    q = fmt.quantize(x)
    assert q.parts["scales"].tolist() == [255, 255]
    assert torch.isnan(fmt.dequantize(q)).all() and torch.isnan(fmt.fake_quant(x)).all()


def test_short_last_block_is_padded_internally():
    x = torch.randn(3, 40)
    fmt = formats.get("mxfp4")
    y = fmt.fake_quant(x)
    # the tail block of 8 is scaled by its own max, as if it stood alone
    assert torch.equal(y[:, 32:], fmt.fake_quant(x[:, 32:].contiguous()))


# --- cross-check with torchao.prototype.mx_formats ---------------------------------------------

to_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor").to_mx

CASES = [
    ("mxfp8-e4m3", torch.float8_e4m3fn),
    ("mxfp8-e5m2", torch.float8_e5m2),
    ("mxfp6-e2m3", "fp6_e2m3"),
    ("mxfp6-e3m2", "fp6_e3m2"),
    ("mxfp4", torch.float4_e2m1fn_x2),
]


@pytest.mark.parametrize("spec,elem", CASES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_bit_exact_with_torchao(spec, elem, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * scale
    x[3, :32] *= 1000  # an outlier block
    x[5, 32:64] = 0  # an all-zero block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_ao, d_ao = to_mx(x, elem, 32)
    fmt = formats.get(spec)
    q = fmt.quantize(x)
    assert torch.equal(q.parts["scales"], s_ao.view(torch.uint8).reshape(-1))
    if spec == "mxfp4":  # both pack the first code of a pair in the low nibble
        assert torch.equal(q.parts["codes"], d_ao.view(torch.uint8).reshape(-1))
    else:
        codes = unpack(q.parts["codes"], fmt.elem_bits, x.numel())
        assert torch.equal(codes, d_ao.view(torch.uint8).reshape(-1))


def test_documented_difference_tiny_blocks():
    # A block whose amax < 2**(emax_elem - 126): both store the E8M0 code 0 (2**-127), but
    # torchao divides by 2**-126 (its clamp to the smallest normal), so its elements come out at
    # half the value ours do. Ours decodes the block at its true magnitude.
    x = block(2.0**-130, 2.0**-131)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_ao, d_ao = to_mx(x, torch.float8_e4m3fn, 32)
    q = formats.get("mxfp8-e4m3").quantize(x)
    assert s_ao.view(torch.uint8).tolist() == [[0]] and q.parts["scales"].tolist() == [0]
    assert (
        d_ao.float()[0, 0].item() == 2.0**-4
        and q.parts["codes"][0].view(torch.float8_e4m3fn).float() == 2.0**-3
    )
    assert not math.isnan(formats.get("mxfp8-e4m3").fake_quant(x)[0, 0].item())
