"""`joules bench`: a tiny model end to end (table and --json), --probe, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import joules.bench
from joules.bench.probe import MachineLimits, probe_machine, save_machine_limits
from joules.cli import app

runner = CliRunner()


@pytest.fixture
def limits_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    lim = MachineLimits("x", torch.get_num_threads(), 5e9, 6e9, {"fp32": 2e10, "bf16": 2e9})
    save_machine_limits(MachineLimits(**{**lim.to_dict(), "cpu_model": _cpu()}))


def _cpu():
    from joules.system import cpu_model

    return cpu_model()


def test_bench_json_and_table(tiny_dir, limits_cached):
    args = ["bench", str(tiny_dir), "--prompt-len", "8,16", "--gen-len", "4", "--repeats", "2"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [(x["prompt_len"], x["batch"]) for x in d["rows"]] == [(8, 1), (16, 1)]
    row = d["rows"][0]
    assert row["decode_energy"]["method"] in ("counter", "sampled", "estimated")
    assert row["decode_j_per_token"] > 0 and row["decode_sol_fraction"] > 0
    assert d["runtime"] == "eager" and d["compute_dtype"] == "fp32"
    assert d["machine"]["cpu_model"] and "cpu_flags" in d["machine"]
    t = runner.invoke(app, [*args[:2], "--prompt-len", "8", "--gen-len", "3", "--repeats", "1"])
    assert t.exit_code == 0, t.output
    assert "TTFT" in t.stdout and "J/tok" in t.stdout and "speed of light" in t.stdout


def test_probe_prints_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    small = lambda threads=None: probe_machine(threads, buffer_bytes=2 << 20, matmul_n=32)  # noqa: E731
    monkeypatch.setattr(joules.bench, "probe_machine", small)
    r = runner.invoke(app, ["bench", "--probe", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["threads"] == 1 and d["read_bw_bytes_s"] > 0 and d["peak_flops"]["fp32"] > 0
    t = runner.invoke(app, ["bench", "--probe", "--threads", "1"])
    assert "read bandwidth" in t.stdout and "GB/s" in t.stdout


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prompt-len", "0"], "positive"),
        (["--prompt-len", "a,b"], "comma-separated"),
        (["--batch", "-2"], "positive"),
        (["--gen-len", "0"], "gen_len"),
        (["--runtime", "warp"], "unknown runtime"),
        (["--dtype", "fp4"], "unknown dtype"),
        (["--prompt-len", "4000"], "context"),
        (["--batch", "100000", "--prompt-len", "2000", "--gen-len", "8"], "GiB"),
    ],
)
def test_bad_input_is_one_line(tiny_dir, extra, match):
    r = runner.invoke(app, ["bench", str(tiny_dir), *extra])
    assert r.exit_code == 2, r.output
    assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1
