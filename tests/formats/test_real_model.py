"""The default model's Linear weights were GGUF Q4_1 (blocks of 32 along the input dim, fp16 d
and m, w = d*q + m): uint4-asym-g32 with min/max rounding must reproduce them."""

from __future__ import annotations

import pytest

from joules import formats


@pytest.mark.real_model
def test_uint4_asym_g32_reproduces_q4_1_weights(smollm2):
    model, _, info = smollm2
    params = dict(model.named_parameters())
    names = [n for n, t in info.gguf_types.items() if t == "Q4_1" and n in params]
    assert len(names) >= 200  # 30 layers x 7 projections
    fmt = formats.get("uint4-asym-g32")
    worst = 0.0
    exact = 0
    total = 0
    for name in names:
        w = params[name].detach()
        assert w.shape[-1] % 32 == 0
        y = fmt.fake_quant(w)
        blocks, err = w.reshape(-1, 32), (y - w).abs().reshape(-1, 32)
        rng = (blocks.amax(1) - blocks.amin(1)).clamp(min=1e-12)
        worst = max(worst, float((err.amax(1) / rng).max()))
        exact += int((y == w).sum())
        total += w.numel()
    assert worst <= 1e-3
    # in fact the fp16 scale and minimum are recovered exactly for nearly every block
    assert exact / total > 0.99


@pytest.mark.real_model
def test_compare_formats_on_the_model(smollm2):
    from joules.formats.error import compare_formats, linear_weights

    model, _, info = smollm2
    weights = linear_weights(model)
    assert len(weights) == 211 and "lm_head.weight" in weights  # 30 x 7 + the tied head
    q41 = {n: w for n, w in weights.items() if info.gguf_types.get(n) == "Q4_1"}
    sub = dict(list(q41.items())[:14])  # two layers keep the test fast
    rows = compare_formats(sub, ["uint4-asym-g32", "int4-g32", "mxfp4"])
    assert [r.tensors for r in rows] == [14, 14, 14]
    assert rows[0].sqnr_db == float("inf") and rows[0].max_abs_error == 0.0  # bit-exact Q4_1
    assert 10 < rows[1].sqnr_db < 30 and 10 < rows[2].sqnr_db < 30
