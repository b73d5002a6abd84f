"""Ternary (BitNet b1.58): absmean scale, {-1, 0, 1}, five trits per byte."""

from __future__ import annotations

import torch

from joules import formats


def test_absmean_scale_and_values():
    x = torch.tensor([0.2, -2.0, 0.9, 0.9])  # mean |x| = 1.0
    fmt = formats.get("ternary")
    assert fmt.fake_quant(x).tolist() == [0.0, -1.0, 1.0, 1.0]
    q = fmt.quantize(x)
    assert q.parts["scales"].tolist() == [1.0] and q.parts["codes"].numel() == 1


def test_storage_is_one_point_six_bits():
    fmt = formats.get("ternary")
    assert fmt.part_bits((1000,))["codes"] == 1600
    assert fmt.quantize(torch.randn(1000)).parts["codes"].numel() == 200


def test_group_variant_scales_each_group():
    x = torch.cat([torch.full((64,), 0.01), torch.full((64,), 10.0)]).reshape(1, 128)
    y = formats.get("ternary-g64").fake_quant(x)
    assert torch.allclose(y[0, :64], torch.full((64,), 0.01), rtol=1e-3)  # fp16 scales
    assert torch.allclose(y[0, 64:], torch.full((64,), 10.0), rtol=1e-3)
