"""``benchmarks/scale.py``'s bookkeeping: which stages a resumed run re-does, the stage runner,
the fits, the docs table (the measurements themselves are the committed JSON)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module")
def scale(bench_script):
    return bench_script("scale")


def test_a_stage_whose_input_is_gone_re_runs_its_producers(scale, tmp_path):
    rows = {f"1b/{s}": {"wall_s": 1.0} for s in ("write", "compress", "export")}
    # perplexity and decode are missing, and the GGUF they read was deleted: export and the
    # compression it reads (its directory is deleted after export) and the checkpoint re-run
    assert scale.stages_to_run("1b", rows, tmp_path, 16) == {
        "write", "compress", "export", "perplexity", "decode",
    }  # fmt: skip
    (tmp_path / "1b-gptq.gguf").write_bytes(b"GGUF")
    assert scale.stages_to_run("1b", rows, tmp_path, 16) == {"perplexity", "decode"}
    # the real default model has no checkpoint stage
    assert "write" not in scale.stages_to_run("135m", {}, tmp_path, 128)


def test_the_runner_reports_time_peak_memory_and_json(scale):
    code = "import json; x = bytearray(200 * 2**20); print(json.dumps({'ok': len(x)}))"
    r = scale.run_measured([sys.executable, "-c", code])
    assert r["json"] == {"ok": 200 * 2**20}
    assert r["peak_rss_bytes"] > 200 * 2**20
    assert r["wall_s"] > 0


def test_the_fit_recovers_an_exponent(scale):
    params = {"135m": 1e8, "1b": 1e9}
    rows = {"135m/compress": {"wall_s": 10.0}, "1b/compress": {"wall_s": 100.0}}
    f = scale.fit(rows, "compress", params)
    assert f["exponent"] == 1.0 and f["s_per_billion_params_at_1b"] == 100.0


def test_the_parameter_counts_need_no_torch(scale):
    assert scale.n_params("8b") == 8_030_261_248
    assert scale.n_params("135m") == 134_515_008


def test_the_loglog_figure_has_a_line_per_measured_stage(scale):
    import json

    record = json.loads(scale.OUT.read_text())
    fig = scale.loglog_figure(record)
    stages = {k.split("/")[1] for k in record["rows"]}
    assert {t.name.split(" ")[0] for t in fig.data} == stages
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "log"
    fitted = [t for t in fig.data if "N^" in t.name]
    assert all(len(t.x) >= 2 for t in fitted)


def test_the_prediction_over_the_measurement_is_a_target(scale):
    record = {
        "parameters": {"135m": 1, "1b": 9},
        "rows": {
            "1b/compress": {
                "wall_s": 100.0, "peak_rss_bytes": 2000, "bytes_written": 0,
                "predicted": {"time_s": 120.0, "peak_rss_bytes": 1800},
            }
        },
    }  # fmt: skip
    t = scale.targets(record)
    assert t["predicted_over_measured_time_1b"] == 1.2
    assert t["predicted_over_measured_rss_1b"] == 0.9
