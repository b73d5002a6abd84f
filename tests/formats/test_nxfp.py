"""NxFP: each technique on its own and together, bit costs, hand-checked blocks."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.formats.packing import unpack


def block(*head: float, fill: float = 0.0) -> torch.Tensor:
    x = torch.full((1, 32), fill)
    x[0, : len(head)] = torch.tensor(head)
    return x


def test_names_and_bit_costs():
    shape = (4096, 4096)
    assert formats.get("nxfp4").config == formats.get("nxfp4-nm-am-cr").config
    assert formats.get("nxfp4-cr").bits_per_element(shape) == 4.25  # recycling is free
    assert formats.get("nxfp4-nm").bits_per_element(shape) == 4.25 + 2 / 32
    assert formats.get("nxfp4-am").bits_per_element(shape) == 4.25 + 2 / 32  # 3 candidates: 2 bits
    assert formats.get("nxfp4-nm3").bits_per_element(shape) == 4.25 + 3 / 32
    assert formats.get("nxfp8-e4m3-am").bits_per_element(shape) == 8.25 + 1 / 32


def test_nanomantissa_tracks_the_block_max():
    # amax 7: MX picks X = 1 and clips 7 to 6. NanoMantissa (2 bits) picks the smallest
    # s = 2**e (1 + j/4) >= 7/6: 1.25, so 7 / 1.25 = 5.6 -> 6 -> 7.5, no clipping.
    x = block(7.0, 1.0)
    assert formats.get("mxfp4").fake_quant(x)[0, 0] == 6.0
    fmt = formats.get("nxfp4-nm")
    q = fmt.quantize(x)
    assert q.parts["scales"].tolist() == [127] and unpack(
        q.parts["nano_mantissa"], 2, 1
    ).tolist() == [1]
    y = fmt.fake_quant(x)
    assert y[0, 0] == 7.5 and y[0, 1] == 1.25
    assert fmt.clip_mask(x).sum() == 0


def test_code_recycling_adds_plus_five():
    # amax 6 -> X = 1; 4.9 is nearer the recycled +5 than 4 or 6; -4.9 has no recycled twin
    x = block(6.0, 4.9, -4.9, 4.5, 5.5)
    y = formats.get("nxfp4-cr").fake_quant(x)
    assert y[0, :5].tolist() == [6.0, 5.0, -4.0, 4.0, 5.0]  # ties: 4.5 -> 4 (smaller), 5.5 -> 5
    q = formats.get("nxfp4-cr").quantize(x)
    assert unpack(q.parts["codes"], 4, 32)[1].item() == 0b1000  # the negative-zero code
    assert formats.get("nxfp4-cr").fake_quant(block(-0.1, 6.0))[0, 0].item() == 0.0  # +0 only


def test_adaptive_microexponent_picks_the_better_encoding():
    # a uniform block fits E1M2 (a uniform grid) better than E2M1; a block with a wide spread
    # fits E3M0 (powers of two)
    uniform = torch.linspace(-3.5, 3.5, 32).reshape(1, 32)
    geometric = torch.tensor([2.0**k for k in range(-3, 4)] * 4 + [0.0] * 4).reshape(1, 32)
    fmt = formats.get("nxfp4-am")
    sel_u = unpack(fmt.quantize(uniform).parts["selector"], 2, 1).item()
    sel_g = unpack(fmt.quantize(geometric).parts["selector"], 2, 1).item()
    assert sel_u == 1 and sel_g == 2  # candidates: 0 E2M1, 1 E1M2, 2 E3M0
    err = lambda s, x: (formats.get(s).fake_quant(x) - x).square().sum()  # noqa: E731
    assert err("nxfp4-am", uniform) < err("mxfp4", uniform)
    assert err("nxfp4-am", geometric) == 0 < err("mxfp4", geometric)


@pytest.mark.parametrize("src", ["gaussian", "laplace", "student-t"])
def test_each_technique_helps_and_all_together_help_most(src):
    from joules.cli.formats import synthetic_tensor

    x = synthetic_tensor(src, (256, 1024))
    mse = {
        s: float((formats.get(s).fake_quant(x) - x).square().mean())
        for s in ["mxfp4", "nxfp4-nm", "nxfp4-am", "nxfp4-cr", "nxfp4"]
    }
    for s in ["nxfp4-nm", "nxfp4-am", "nxfp4-cr"]:
        assert mse[s] < mse["mxfp4"], (s, mse)
    assert mse["nxfp4"] < min(mse["nxfp4-nm"], mse["nxfp4-am"], mse["nxfp4-cr"])


def test_nxfp_8_and_6_bit_variants_work():
    x = torch.randn(4, 64)
    for spec in ["nxfp8-e4m3", "nxfp6-e3m2-cr"]:
        fmt = formats.get(spec)
        assert torch.equal(fmt.fake_quant(x), fmt.dequantize(fmt.quantize(x)))
        assert (fmt.fake_quant(x) - x).abs().max() <= 2**-3 * x.abs().max()  # >= 2 mantissa bits
