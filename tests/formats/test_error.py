"""Error analysis: metric definitions on hand examples, theory vs measurement, compare_formats."""

from __future__ import annotations

import math

import pytest
import torch

from joules import formats
from joules.formats.error import (
    bfp_bound,
    compare_formats,
    format_error,
    gaussian_bfp_sqnr_db,
    linear_weights,
)


def test_metrics_on_a_hand_example():
    # int4 per tensor, scale 7/7 = 1: [7, 0.4, -2.6, 1.5] -> [7, 0, -3, 2]
    x = torch.tensor([7.0, 0.4, -2.6, 1.5])
    e = format_error("int4", x)
    err = torch.tensor([0.0, 0.4, 0.4, 0.5])
    assert e.mse == pytest.approx(float(err.square().mean()))
    assert e.sqnr_db == pytest.approx(10 * math.log10(float(x.square().sum() / err.square().sum())))
    assert e.max_abs_error == pytest.approx(0.5)
    assert e.max_rel_error == pytest.approx(1.0)  # 0.4 -> 0
    assert e.frac_clipped == 0.0
    assert e.bits_per_element == (4 * 4 + 32) / 4
    assert e.bound_max_abs_error is None  # one scale per tensor: not a block format


def test_lossless_and_clipping():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert format_error("fp8-e4m3-raw", x).sqnr_db == math.inf
    y = torch.full((1, 32), 1.0)
    y[0, 0] = 7.9  # MX floor rule: X = 1, 7.9 clips to 6
    e = format_error("mxfp4", y)
    assert e.frac_clipped == pytest.approx(1 / 32)


@pytest.mark.parametrize(
    "spec", ["mxint8", "mxfp4", "mxfp8-e4m3", "mxfp6-e2m3", "int4-g32", "fp4-e2m1-g32"]
)
def test_measured_error_respects_the_bound_and_tracks_the_model(spec):
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    fmt = formats.get(spec)
    e = format_error(fmt, x)
    err = (fmt.fake_quant(x) - x).abs()
    in_range = ~fmt.clip_mask(x)
    assert float(err[in_range].max()) <= e.bound_max_abs_error * (1 + 1e-6)
    # the uniform-noise model is within 2 dB of the measurement on Gaussian data
    assert abs(e.sqnr_model_db - e.sqnr_db) < 2.0, (e.sqnr_model_db, e.sqnr_db)


def test_bfp_theory_matches_mxint8_and_gaussian_expectation():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    b = bfp_bound(x, 32, 7)
    e = format_error("mxint8", x)
    assert b.mse_model == pytest.approx(e.mse_model, rel=1e-6)
    assert abs(b.sqnr_model_db - e.sqnr_db) < 0.5
    assert abs(gaussian_bfp_sqnr_db(32, 7) - e.sqnr_db) < 0.5  # expectation over N(0,1) blocks
    # ~6.02 dB per mantissa bit; larger blocks draw larger maxima and lose SQNR
    assert gaussian_bfp_sqnr_db(32, 8) - gaussian_bfp_sqnr_db(32, 7) == pytest.approx(
        6.02, abs=0.01
    )
    assert gaussian_bfp_sqnr_db(16, 7) > gaussian_bfp_sqnr_db(32, 7) > gaussian_bfp_sqnr_db(256, 7)


def test_compare_formats_accepts_tensor_dict_and_model(tiny):
    model, _, _ = tiny
    w = linear_weights(model)
    assert w and all(t.dim() == 2 for t in w.values())
    rows = compare_formats(model, ["int8", "nf4"])
    assert [r.format for r in rows] == ["int8", "nf4"] and rows[0].tensors == len(w)
    assert rows[0].numel == sum(t.numel() for t in w.values())
    assert rows[0].sqnr_db > rows[1].sqnr_db
    seen = []
    compare_formats(
        {"a": torch.randn(8, 8), "b": torch.randn(4)},
        ["mxfp4"],
        progress=lambda s, n: seen.append((s, n)),
    )
    assert seen == [("mxfp4", "a"), ("mxfp4", "b")]
    one = compare_formats(torch.randn(16, 32), ["mxfp4"])[0]
    assert one.tensors == 1 and one.to_dict()["format"] == "mxfp4" and one.emulated
