"""Integer formats: clamp ranges, rounding, asymmetric offsets and granularity."""

from __future__ import annotations

import torch

from joules import formats


def test_symmetric_int4_range_and_rounding():
    x = torch.tensor([7.0, -7.0, 3.5, 2.5, -0.5, 0.49])  # scale = 7 / 7 = 1
    y = formats.get("int4").fake_quant(x)
    assert y.tolist() == [7.0, -7.0, 4.0, 2.0, -0.0, 0.0]  # half to even; [-7, 7]
    codes = formats.get("int4").quantize(x)
    assert codes.parts["scales"].tolist() == [1.0]


def test_per_channel_and_group_scales():
    x = torch.tensor([[1.0, 2.0, 3.0, 127.0], [0.5, 0.25, 0.125, 1.0]])
    ch = formats.get("int8-ch").quantize(x)
    assert ch.parts["scales"][0].item() == 1.0  # 127 / 127
    assert ch.parts["scales"].dtype == torch.float16 and ch.parts["scales"].numel() == 2
    g = formats.get("int8-g2").quantize(x)
    assert g.parts["scales"].numel() == 4
    assert torch.equal(formats.get("int8-ch").fake_quant(x)[0], x[0])


def test_asym_is_min_max_with_float_minimum():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])  # min -1, max 2: s = 3/15 = 0.2
    fmt = formats.get("uint4-asym")
    q = fmt.quantize(x)
    assert abs(q.parts["scales"].item() - 0.2) < 1e-7 and q.parts["offsets"].item() == -1.0
    y = fmt.fake_quant(x)
    assert y[0, 0] == -1.0 and abs(y[0, 3].item() - 2.0) < 1e-6  # both ends exact


def test_int_zero_point_variant_has_exact_zero():
    x = torch.tensor([[-1.0, 0.0, 0.3, 2.0]])
    fmt = formats.get("uint4-asym-zpint")
    assert fmt.fake_quant(x)[0, 1] == 0.0
    assert fmt.part_bits((1, 4))["offsets"] == 4


def test_constant_and_zero_groups():
    for spec in ["int4-g4", "uint4-asym-g4", "int8"]:
        fmt = formats.get(spec)
        z = torch.zeros(2, 4)
        assert torch.equal(fmt.fake_quant(z), z)
    c = torch.full((1, 4), 0.75)
    assert torch.equal(formats.get("uint4-asym-g4").fake_quant(c), c)


def test_clip_mask_counts_nothing_for_absmax_formats():
    x = torch.randn(16, 64)
    assert formats.get("int4-g32").clip_mask(x).sum() == 0
    assert formats.get("uint4-asym-g32").clip_mask(x).sum() == 0
