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
from joules.predict.result import Prediction
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


def _synthetic(shape, hw, noise, seed=0, fmt="fp32", method="counter"):
    """16 runs made with the TRUE coefficients; energies labelled ``method`` (None: latency
    only, as llama.cpp runs)."""
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
                        t.prefill_energy_j * n() if method else None,
                        t.decode_energy_j * n() if method else None,
                        energy_method=method,
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


# -- energy only from a meter; catalog otherwise; degenerate fits ------------------------------

ENERGY = ("static_w", "e_flop_j", "e_byte_j", "max_power_w")


def _idle_j_per_token(p, hw):
    """What J/token would be if the energy model were idle power x time."""
    w = p.workload
    return hw.idle_w * p.total_s / (w["batch"] * w["gen_len"])


def test_latency_only_runs_keep_the_catalog_energy(small_shape):
    """llama.cpp runs and latency-only results carry no energy: the calibration keeps the
    catalog's energy coefficients, says so, and J/token is not idle power x time."""
    hw = synthetic_hw(flops=2e10, bw=4e9)
    cal = fit(_synthetic(small_shape, hw, noise=0.0, method=None), hw)
    c, cat = cal.coefficients, Coefficients.uncalibrated(hw)
    assert [getattr(c, k) for k in ENERGY] == [getattr(cat, k) for k in ENERGY]
    assert all(c.status[k] == "catalog" for k in ENERGY)
    assert c.status["bandwidth_efficiency"] == c.status["flops_efficiency"] == "fitted"
    assert cal.energy_method is None and cal.n_energy_runs == 0 and not c.energy_band
    assert any("energy coefficients from the catalog" in n for n in cal.notes)
    p = predict(small_shape, hw, Workload(256, 12, 4), coefficients=c)
    # the catalog energy model over the calibrated time: well above idle x time
    assert p.j_per_token > 1.5 * _idle_j_per_token(p, hw)
    assert any("energy from the catalog" in n for n in p.notes)


def test_fewer_than_three_measured_runs_keep_the_catalog_energy(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    obs = _synthetic(small_shape, hw, noise=0.0)
    for o in obs[2:]:  # two runs keep their metered energy (four phase rows)
        o.prefill_energy_j = o.decode_energy_j = None
    cal = fit(obs, hw)
    assert all(cal.coefficients.status[k] == "catalog" for k in ENERGY)
    assert cal.coefficients.e_flop_j == Coefficients.uncalibrated(hw).e_flop_j > 0
    # a third metered run is enough
    obs3 = _synthetic(small_shape, hw, noise=0.0)
    for o in obs3[3:]:
        o.prefill_energy_j = o.decode_energy_j = None
    c3 = fit(obs3, hw).coefficients
    assert all(c3.status[k] == "fitted" for k in ENERGY[:3]) and "max_power_w" not in c3.status
    assert c3.e_flop_j == pytest.approx(TRUE.e_flop_j, rel=1e-6)


def test_estimated_energy_is_never_fitted(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    # all estimated (the method given to fit, as `joules predict calibrate` passes it)
    obs = _synthetic(small_shape, hw, noise=0.0, method=None)
    for o, ref in zip(obs, _synthetic(small_shape, hw, noise=0.0), strict=True):
        o.prefill_energy_j, o.decode_energy_j = ref.prefill_energy_j, ref.decode_energy_j
    cal = fit(obs, hw, energy_method="estimated")
    assert all(cal.coefficients.status[k] == "catalog" for k in ENERGY)
    assert any("estimated" in n for n in cal.notes) and cal.energy_method is None
    # mixed: the metered runs alone are fitted, the estimated ones (5x off here) are left out
    mixed = _synthetic(small_shape, hw, noise=0.0)
    for o in mixed[::2]:
        o.energy_method = "estimated"
        o.prefill_energy_j *= 5
        o.decode_energy_j *= 5
    cal = fit(mixed, hw)
    c = cal.coefficients
    assert cal.n_energy_runs == 8 and cal.energy_method == "counter"
    assert all(c.status[k] == "fitted" for k in ENERGY[:3]) and c.max_power_w is None
    assert c.static_w == pytest.approx(TRUE.static_w, rel=1e-6)
    assert c.e_flop_j == pytest.approx(TRUE.e_flop_j, rel=1e-6)
    assert c.e_byte_j == pytest.approx(TRUE.e_byte_j, rel=1e-6)


def test_energy_of_unknown_method_is_not_fitted(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    obs = _synthetic(small_shape, hw, noise=0.0)
    for o in obs:
        o.energy_method = None
    cal = fit(obs, hw)
    assert all(cal.coefficients.status[k] == "catalog" for k in ENERGY)
    assert any("without a meter method" in n for n in cal.notes)


def _work_free_runs(shape, hw):
    """Runs whose time does not grow with the work (a fixed cost per step, as a runtime
    dominated by launch overheads): overheads explain them, and the least-squares FLOP and
    bandwidth terms want to be 0 s, i.e. an infinite efficiency, which the bound stops."""
    runs = _synthetic(shape, hw, noise=0.0, method=None)
    for o in runs:
        o.prefill_s, o.tpot_s = 0.05, 0.01
    return runs


def test_a_coefficient_at_its_bound_is_a_degenerate_fit(small_shape):
    hw = synthetic_hw(flops=2e10, bw=4e9)
    cal = fit(_work_free_runs(small_shape, hw), hw)
    c = cal.coefficients
    assert c.bandwidth_efficiency == pytest.approx(100.0)
    d = c.degenerate["bandwidth_efficiency"]
    assert d["bound"] == "upper" and d["limit"] == pytest.approx(100.0)
    assert "bandwidth_efficiency at its upper bound 100" in c.degenerate_summary()
    assert any(n.startswith("degenerate fit: ") for n in cal.notes)
    p = predict(small_shape, hw, Workload(64, 4), coefficients=c)
    assert p.method.startswith("predicted (degenerate fit: ")
    assert "bandwidth_efficiency at its upper bound 100" in p.method
    assert p.degenerate_fit and Prediction.from_dict(p.to_dict()).degenerate_fit
    # a fit inside its bounds is not degenerate
    ok = fit(_synthetic(small_shape, hw, noise=0.01), hw).coefficients
    assert ok.degenerate == {} and ok.degenerate_summary() == ""
    p = predict(small_shape, hw, Workload(64, 4), coefficients=ok)
    assert p.method == "predicted" and not p.degenerate_fit


def test_an_unidentifiable_latency_coefficient_keeps_the_catalog_value(small_shape):
    """fp32 runs dequantise nothing: the dequantisation time is the catalog's, not a 0 s the
    bound put there, and the calibration says so."""
    hw = synthetic_hw(flops=2e10, bw=4e9)
    c = fit(_synthetic(small_shape, hw, noise=0.0), hw).coefficients
    assert c.status["dequant_s_per_element"] == "catalog"
    assert c.dequant_s_per_element == Coefficients.uncalibrated(hw).dequant_s_per_element > 0
    assert "dequant_s_per_element" not in c.degenerate
    p = predict(small_shape, hw, Workload(64, 4), coefficients=c)
    assert any("kept from the catalog" in n and "dequant" in n for n in p.notes)


def test_status_survives_storage(small_shape, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    hw = synthetic_hw(flops=2e10, bw=4e9)
    cal = fit(_work_free_runs(small_shape, hw), hw)
    save_calibration(cal)
    back = load_calibration("synthetic")
    assert back.coefficients.status == cal.coefficients.status
    assert back.degenerate == cal.degenerate and back.degenerate
    assert predict(small_shape, hw, Workload(64, 4)).degenerate_fit


def test_per_row_energy_method_from_a_bench_result(small_shape):
    row = {"prompt_len": 64, "gen_len": 16, "batch": 1, "ttft_s": 0.2, "tpot_s": 0.05}
    result = {
        "rows": [
            row | {"prefill_energy": {"median_j": 3.0, "method": "counter"}},
            row | {"prefill_energy": {"median_j": 3.0, "method": "estimated"}},
            row
            | {
                "prefill_energy": {"median_j": 3.0, "method": "counter"},
                "decode_energy": {"median_j": 9.0, "method": "sampled"},
            },
        ]
    }
    obs, _ = observations_from_bench(result, small_shape, "fp32")
    assert [o.energy_method for o in obs] == ["counter", "estimated", "sampled"]
