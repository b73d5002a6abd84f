import numpy as np
import pytest

from joules.predict.calibrate import (
    Observation,
    fit,
    load_calibration,
    observations_from_bench,
    save_calibration,
)
from joules.predict.predictor import predict
from joules.predict.roofline import Coefficients, Workload

from .conftest import synthetic_hw

TRUE = Coefficients(
    flops_efficiency=0.35,
    bandwidth_efficiency=0.6,
    overhead_s={"prefill": 40e-6, "decode": 25e-6},
    dequant_s_per_element=0.0,
    static_w=6.0,
    e_flop_j=2e-11,
    e_byte_j=3e-10,
    max_power_w=None,
)


def _synthetic(shape, hw, noise, seed=0, fmt="fp32"):
    rng = np.random.default_rng(seed)
    obs = []
    for p in (16, 64, 256, 512):
        for g in (4, 12):
            for b in (1, 4):
                wl = Workload(p, g, b)
                t = predict(shape, hw, wl, weight_format=fmt, coefficients=TRUE)
                n = lambda: 1 + noise * rng.standard_normal()  # noqa: E731
                obs.append(
                    Observation(
                        shape,
                        wl,
                        fmt,
                        t.prefill_s * n(),
                        t.tpot_s * n(),
                        t.prefill_energy_j * n(),
                        t.decode_energy_j * n(),
                    )
                )
    return obs


def test_calibration_recovers_known_coefficients_from_noisy_measurements(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    cal = fit(_synthetic(small_shape, hw, noise=0.02), hw)
    c = cal.coefficients
    assert c.calibrated and cal.n_points == 16
    assert c.flops_efficiency == pytest.approx(TRUE.flops_efficiency, rel=0.1)
    assert c.bandwidth_efficiency == pytest.approx(TRUE.bandwidth_efficiency, rel=0.1)
    assert c.overhead_s["decode"] == pytest.approx(TRUE.overhead_s["decode"], rel=0.25)
    # energy: time, FLOPs and bytes are nearly collinear on one model, so single energy
    # coefficients move with the noise; the energy they predict does not
    # the band reflects the noise (2 % per point): a few percent, not zero and not 50 %
    assert 0.005 < c.band["decode"] < 0.1
    # predictions with the fit land within the noise of the truth
    wl = Workload(128, 8, 2)
    got = predict(small_shape, hw, wl, coefficients=c)
    want = predict(small_shape, hw, wl, coefficients=TRUE)
    assert got.tpot_s == pytest.approx(want.tpot_s, rel=0.05)
    assert got.prefill_s == pytest.approx(want.prefill_s, rel=0.05)
    assert got.interval("decode")[0] < got.tpot_s < got.interval("decode")[1]
    assert got.decode_energy_j == pytest.approx(want.decode_energy_j, rel=0.05)
    assert got.prefill_energy_j == pytest.approx(want.prefill_energy_j, rel=0.05)


def test_noise_free_fit_is_exact(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    c = fit(_synthetic(small_shape, hw, noise=0.0), hw).coefficients
    assert c.flops_efficiency == pytest.approx(0.35, rel=1e-6)
    assert c.bandwidth_efficiency == pytest.approx(0.6, rel=1e-6)
    assert c.overhead_s["prefill"] == pytest.approx(40e-6, rel=1e-6)
    assert c.band["prefill"] < 1e-6
    assert c.static_w == pytest.approx(TRUE.static_w, rel=1e-6)
    assert c.e_flop_j == pytest.approx(TRUE.e_flop_j, rel=1e-6)
    assert c.e_byte_j == pytest.approx(TRUE.e_byte_j, rel=1e-6)


def test_too_few_points_is_an_error(small_shape):
    from joules.errors import ConfigError

    hw = synthetic_hw()
    with pytest.raises(ConfigError, match="at least 3"):
        fit(_synthetic(small_shape, hw, 0.0)[:2], hw)


def test_calibration_is_stored_per_machine(small_shape, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    hw = synthetic_hw()
    cal = fit(_synthetic(small_shape, hw, 0.01), hw)
    path = save_calibration(cal)
    assert path.parent == tmp_path / "predict" and path.stem == "synthetic"
    back = load_calibration("synthetic")
    assert back.coefficients == cal.coefficients
    # predict() picks the stored calibration for that machine
    p = predict(small_shape, hw, Workload(64, 4))
    assert p.calibrated and "decode" in p.band


def test_observations_from_a_bench_result(small_shape):
    result = {
        "energy_method": "estimated",
        "rows": [
            {
                "prompt_len": 64,
                "gen_len": 16,
                "batch": 1,
                "ttft_s": {"median": 0.2},
                "tpot_s": 0.05,
                "prefill_energy_j": 3.0,
                "decode_energy_j": 20.0,
            },
            {"prompt_len": 128, "gen_len": 16, "batch": 2, "ttft_s": 0.4, "tpot_s": 0.06},
        ],
    }
    obs, method = observations_from_bench(result, small_shape, "fp32")
    assert method == "estimated" and len(obs) == 2
    assert obs[0].prefill_s == 0.2 and obs[1].workload.batch == 2
    assert obs[1].prefill_energy_j is None


def test_observations_from_a_joules_bench_result_layout(small_shape):
    # the layout of BenchResult.to_dict(): intervals and per-phase energy records
    iv = lambda x: {"median": x, "ci95_low": x, "ci95_high": x, "values": [x]}  # noqa: E731
    result = {
        "model": "smollm2-135m",
        "compute_dtype": "fp32",
        "rows": [
            {
                "prompt_len": 128,
                "batch": 1,
                "gen_len": 64,
                "ttft_s": iv(0.5),
                "tpot_s": iv(0.09),
                "prefill_energy": {"median_j": 4.0, "method": "estimated"},
                "decode_energy": {"median_j": 30.0, "method": "estimated"},
            }
        ],
    }
    (o,), method = observations_from_bench(result, small_shape)
    assert (o.prefill_s, o.tpot_s, o.prefill_energy_j, o.decode_energy_j) == (0.5, 0.09, 4.0, 30.0)
    assert method == "estimated" and o.workload.compute_dtype == "fp32"


def test_decode_flops_efficiency_is_fitted_apart_when_decode_is_compute_bound(small_shape):
    """Decode matmuls with few rows run far below prefill's efficiency: with batch-16 decode
    steps compute-bound, the fit recovers both efficiencies exactly (no noise)."""
    from dataclasses import replace

    hw = synthetic_hw(flops=2e10, bw=4e9)
    true = replace(TRUE, decode_flops_efficiency=0.02)
    obs = []
    for p in (16, 64, 256):
        for g in (4, 12):
            for b in (1, 16):
                wl = Workload(p, g, b)
                t = predict(small_shape, hw, wl, coefficients=true)
                obs.append(Observation(small_shape, wl, "fp32", t.prefill_s, t.tpot_s))
    assert any(
        predict(small_shape, hw, o.workload, coefficients=true).bound("decode") == "compute"
        for o in obs
    )
    c = fit(obs, hw).coefficients
    assert c.flops_efficiency == pytest.approx(0.35, rel=1e-2)
    # with decode's efficiency the same as prefill's, none is fitted apart
    assert (
        fit(_synthetic(small_shape, hw, noise=0.0), hw).coefficients.decode_flops_efficiency is None
    )
    assert c.decode_flops_efficiency == pytest.approx(0.02, rel=1e-2)
