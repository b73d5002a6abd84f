"""The pre-run prediction of a compression's time and peak memory (joules.predict.compress_cost).

Whether it lands within 25 % of a real run is measured by benchmarks/scale.py (timing is never a
unit test); here: the terms scale with the shape as they must, the cache, and the CLI's refusal.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from joules.cli import app
from joules.models.synthetic import synthetic_config
from joules.predict import compress_cost
from joules.predict.compress_cost import UnitCosts, predict_compress

COSTS = UnitCosts(
    col_overhead_s=5e-5, col_s_per_row=1e-7, flops_1t={128: 5e10, 1024: 5e10},
    flops_mt={64: 1e10, 1024: 1e11}, factor_flops_1t={512: 5e9, 2048: 1e10},
    base_rss_bytes=400 << 20,
)  # fmt: skip
GPTQ = "gptq(format=gguf-q4_0)"


def _p(cfg, **kw):
    args = {"calib_n": 128, "calib_len": 256, "costs": COSTS} | kw
    return predict_compress(cfg, GPTQ, **args)


def test_time_grows_with_depth_and_layered_memory_does_not():
    cfg = synthetic_config("llama-3.2-1b")
    one, two = _p(cfg | {"num_hidden_layers": 8}), _p(cfg | {"num_hidden_layers": 16})
    assert two.time_s == pytest.approx(2 * one.time_s)
    assert two.peak_rss_bytes == one.peak_rss_bytes
    mem1 = _p(cfg | {"num_hidden_layers": 8}, layered=False)
    mem2 = _p(cfg | {"num_hidden_layers": 16}, layered=False)
    assert mem2.peak_rss_bytes > mem1.peak_rss_bytes > one.peak_rss_bytes


def test_terms_follow_their_counts():
    cfg = synthetic_config("llama-3.2-1b")
    full, half = _p(cfg), _p(cfg, calib_n=64)
    # forward and Hessians are linear in the tokens; the solve does not see them
    assert half.terms_s["hessians"] == pytest.approx(full.terms_s["hessians"] / 2)
    assert half.terms_s["column_solve"] == full.terms_s["column_solve"]
    assert half.terms_s["factorise"] == full.terms_s["factorise"]
    # 8B: the widest input (down_proj's 14,336) dominates the working set: fp64 sum + its fp32
    # copy, then three fp32 matrices
    big = _p(synthetic_config("llama-3-8b"), calib_n=16)
    assert big.memory_bytes["working"] == 14336**2 * 12
    assert big.memory_bytes["embedding"] == 128256 * 4096 * 2  # bf16; the head stays on disk


def test_steps_without_a_cost_model_are_named():
    p = predict_compress(synthetic_config("smollm2-135m"), "awq(format=int4-g64) | rtn(format=int8)",
                         calib_n=8, calib_len=64, costs=COSTS)  # fmt: skip
    assert p.unmodelled_steps == ["awq"] and p.terms_s["rtn"] > 0


def test_unit_costs_are_cached_and_a_busy_probe_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(threads=None):
        calls.append(threads)
        return COSTS

    monkeypatch.setattr(compress_cost, "measure_unit_costs", fake_measure)
    assert compress_cost.load_unit_costs(2) == COSTS
    assert compress_cost.load_unit_costs(2) == COSTS and len(calls) == 1
    data = json.loads((tmp_path / compress_cost.CACHE_FILE).read_text())
    (entry,) = data["entries"].values()
    entry["load"] = {"busy": True}
    (tmp_path / compress_cost.CACHE_FILE).write_text(json.dumps(data))
    compress_cost.load_unit_costs(2)
    assert len(calls) == (1 if compress_cost.machine_load().busy else 2)


def test_the_cli_says_the_prediction_and_refuses_what_will_not_fit(tiny_dir, tmp_path, monkeypatch):
    import psutil

    monkeypatch.setattr(compress_cost, "load_unit_costs", lambda threads=None: COSTS)
    runner = CliRunner()
    args = ["compress", str(tiny_dir), "-r", "gptq(format=int4-g32)", "--calib-n", "4",
            "--calib-len", "32"]  # fmt: skip
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "q"), "--json"])
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)["prediction"]
    assert pred["method"] == "predicted" and pred["time_s"] > 0
    # memory for the base process and one calibration sequence, not four
    one = predict_compress(
        compress_cost.config_from_info(_tiny_info(tiny_dir)), "gptq(format=int4-g32)",
        calib_n=1, calib_len=32, layered=False, costs=COSTS,
    )  # fmt: skip

    class VM:
        available = one.peak_rss_bytes + 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "x"), "--in-memory"])
    assert r.exit_code == 2
    line = r.output.strip()
    assert "(predicted)" in line and "--calib-n 1" in line and "GiB free" in line
    assert not (tmp_path / "x").exists()


def _tiny_info(path):
    from joules.models import load_model

    return load_model(path)[2]
