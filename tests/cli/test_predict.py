"""`joules predict MODEL`, `predict hardware`, `predict calibrate`: tables, JSON, bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()
CFG = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 768,
    "vocab_size": 1000,
}


def _cfg(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(CFG))
    return str(p)


def test_predict_model_by_default_side_by_side(tmp_path):
    cfg = _cfg(tmp_path)
    r = runner.invoke(
        app,
        [
            "predict",
            cfg,
            "--hardware",
            "h100,a100",
            "--format",
            "int4-g128",
            "--prompt-len",
            "64",
            "--gen-len",
            "8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "nvidia-h100-sxm" in r.stdout and "nvidia-a100-sxm" in r.stdout
    assert "predicted" in r.stdout
    # the explicit subcommand is the same command
    r2 = runner.invoke(app, ["predict", "model", cfg, "--hardware", "h100", "--json"])
    d = json.loads(r2.stdout)
    assert all(p["method"] == "predicted" for p in d["predictions"])
    assert d["model"]["n_params"] > 0


def test_unknown_hardware_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["predict", _cfg(tmp_path), "--hardware", "tpu-v9"])
    assert r.exit_code == 2
    assert "unknown hardware 'tpu-v9'" in r.output and "h100" in r.output
    assert "Traceback" not in r.output


def test_malformed_catalog_names_the_key(tmp_path):
    bad = tmp_path / "cat.json"
    bad.write_text(
        json.dumps(
            {"devices": [{"id": "x", "kind": "gpu", "name": "X", "tdp_w": 10, "source": "s"}]}
        )
    )
    r = runner.invoke(app, ["predict", "hardware", "--catalog", str(bad)])
    assert r.exit_code == 2 and "x: missing key 'perf'" in r.output


def test_hardware_lists_the_catalog_with_sources():
    r = runner.invoke(app, ["predict", "hardware", "--json"])
    assert r.exit_code == 0, r.output
    ids = {h["id"]: h for h in json.loads(r.stdout)}
    assert "nvidia-h100-sxm" in ids and ids["nvidia-h100-sxm"]["sources"]["performance"]


def test_calibrate_from_results(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    cfg = _cfg(tmp_path)
    rows = [
        {
            "prompt_len": p,
            "gen_len": 8,
            "batch": 1,
            "ttft_s": 0.01 + p * 1e-4,
            "tpot_s": 0.004 + p * 1e-6,
        }
        for p in (16, 32, 64, 128, 256)
    ]
    res = tmp_path / "bench.json"
    res.write_text(json.dumps({"rows": rows}))
    r = runner.invoke(
        app,
        [
            "predict",
            "calibrate",
            "--from",
            str(res),
            "--model",
            cfg,
            "--hardware",
            "h100",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["hardware"] == "nvidia-h100-sxm" and d["coefficients"]["calibrated"]
    assert (tmp_path / "predict" / "nvidia-h100-sxm.json").is_file()
    r = runner.invoke(app, ["predict", "calibrate", "--from", str(tmp_path / "none.json")])
    assert r.exit_code == 2 and "cannot read bench results" in r.output


def test_calibrate_says_which_coefficients_are_fitted(tmp_path, monkeypatch):
    """Latency-only runs: the table names each coefficient's origin and the energy ones are
    the catalog's, with the reason printed."""
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    cfg = _cfg(tmp_path)
    rows = [
        {"prompt_len": p, "gen_len": 8, "batch": 1, "ttft_s": 0.01 + p * 1e-4, "tpot_s": 0.004}
        for p in (16, 32, 64, 128, 256)
    ]
    res = tmp_path / "bench.json"
    res.write_text(json.dumps({"rows": rows}))
    args = ["predict", "calibrate", "--from", str(res), "--model", cfg, "--hardware", "h100"]
    r = runner.invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "from" in out and "catalog" in out and "fitted" in out
    assert "energy coefficients from the catalog" in out
    d = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    status = d["coefficients"]["status"]
    assert status["e_flop_j"] == status["static_w"] == "catalog"
    assert status["bandwidth_efficiency"] == "fitted"
    assert d["coefficients"]["e_flop_j"] > 0 and d["n_energy_runs"] == 0
