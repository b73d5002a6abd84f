"""NF4: the level table, its normal-quantile construction and block absmax encoding."""

from __future__ import annotations

import torch

from joules import formats
from joules.formats.nf4 import NF4_LEVELS, normal_float_levels


def test_levels_match_the_quantile_construction():
    built = normal_float_levels()
    assert len(built) == 16 == len(NF4_LEVELS)
    assert max(abs(a - b) for a, b in zip(built, NF4_LEVELS, strict=True)) < 1e-6
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[15] == 1.0


def test_every_level_times_absmax_is_exact():
    lv = torch.tensor(NF4_LEVELS)
    x = torch.cat([lv, lv.flip(0)] * 2).reshape(1, 64) * 3.0  # absmax 3 in one block of 64
    y = formats.get("nf4").fake_quant(x)
    assert torch.equal(
        y,
        (torch.tensor(NF4_LEVELS) * 3.0)
        .repeat(4)[torch.cat([torch.arange(16), torch.arange(15, -1, -1)] * 2)]
        .reshape(1, 64),
    )


def test_nearest_level_and_block_scales():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1], x[0, 64] = 2.0, 0.1, -5.0  # block 0 absmax 2, block 1 absmax 5
    fmt = formats.get("nf4")
    q = fmt.quantize(x)
    assert q.parts["scales"].tolist() == [2.0, 5.0] and q.parts["scales"].dtype == torch.float32
    y = fmt.fake_quant(x)
    assert y[0, 0] == 2.0 and y[0, 64] == -5.0
    # 0.1 / 2 = 0.05: nearest levels 0.0 and 0.0796 -> 0.0796 (0.05 is past their midpoint 0.0398)
    assert abs(y[0, 1].item() - 2 * NF4_LEVELS[8]) < 1e-7
