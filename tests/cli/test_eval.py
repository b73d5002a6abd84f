"""`joules eval`: each task through the CLI (table and --json), and each bad input as exit 2."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from joules.cli import app
from joules.data import load_text
from joules.evaluate.perplexity import perplexity
from joules.models import load_model

runner = CliRunner()


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_wikitext2_json_matches_the_library(tiny_dir):
    args = ["eval", str(tiny_dir), "--task", "wikitext2", "--limit-tokens", "200"]
    d = _json(runner.invoke(app, [*args, "--window", "64", "--stride", "32", "--json"]))
    m, tok, _ = load_model(tiny_dir)
    lib = perplexity(m, tok, load_text("wikitext2", "test"), window=64, stride=32, limit_tokens=200)
    assert d["perplexity"] == pytest.approx(lib.perplexity, rel=1e-6)
    assert d["protocol"]["window"] == 64 and d["protocol"]["stride"] == 32
    assert d["protocol"]["dataset"] == "wikitext2" and d["protocol"]["split"] == "test"
    assert d["protocol"]["dtype"] == lib.protocol.dtype == "float32"
    assert d["protocol"]["compute_path"] == lib.protocol.compute_path
    table = runner.invoke(app, [*args, "--window", "64"])
    assert table.exit_code == 0 and "perplexity" in table.stdout and "window 64" in table.stdout


def test_hellaswag_json_and_user_jsonl(tiny_dir, tmp_path):
    d = _json(
        runner.invoke(app, ["eval", str(tiny_dir), "--task", "hellaswag", "--limit", "3", "--json"])
    )
    assert d["n"] == 3 and d["protocol"]["seed"] == 1234 and 0 <= d["acc_norm"] <= 1
    f = tmp_path / "mine.jsonl"
    f.write_text('{"context": "Two and", "endings": ["two.", "a cat."], "label": 0}\n')
    out = runner.invoke(app, ["eval", str(tiny_dir), "--task", "hellaswag", "--data", str(f)])
    assert out.exit_code == 0 and "acc_norm" in out.stdout


def test_deviation_of_a_model_against_itself(tiny_dir):
    args = ["eval", str(tiny_dir), "--task", "deviation", "--reference", str(tiny_dir)]
    d = _json(runner.invoke(app, [*args, "--limit-tokens", "100", "--window", "50", "--json"]))
    assert d["kl_mean"] == 0 and d["top1_agreement"] == 1 and d["tokens_scored"] == 98
    bf16 = runner.invoke(
        app,
        [
            "eval",
            str(tiny_dir),
            "--task",
            "deviation",
            "--dtype",
            "bf16",
            "--limit-tokens",
            "100",
            "--window",
            "50",
        ],
    )
    assert bf16.exit_code == 0, bf16.output
    assert "KL mean" in bf16.stdout and "lowest output SQNR" in bf16.stdout


def test_attention_deviation_json():
    d = _json(
        runner.invoke(
            app,
            [
                "eval",
                "--task",
                "attention-deviation",
                "--seq-lens",
                "64",
                "--dtypes",
                "fp32,bf16",
                "--block-sizes",
                "32",
                "--heads",
                "1",
                "--json",
            ],
        )
    )
    assert {r["impl"] for r in d["rows"]} >= {"standard", "flash-style", "sdpa-math"}
    assert d["ratios_bf16"][0]["seq_len"] == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mmlu"], "unknown task 'mmlu'"),
        (["--task", "wikitext2", "--dtype", "fp8"], "--dtype must be one of auto, fp32, bf16"),
        (["--task", "wikitext2", "--window", "64", "--stride", "65"], "stride must be between"),
        (["--task", "attention-deviation", "--seq-lens", "a,b"], "--seq-lens must be"),
        (["--task", "wikitext2", "--data", "/nonexistent.txt"], "no text data set or file"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(tiny_dir, args, message):
    r = runner.invoke(app, ["eval", str(tiny_dir), *args])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_malformed_jsonl_names_the_line(tiny_dir, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "a", "endings": ["b", "c"], "label": 0}\n{"context": "a"}\n')
    r = runner.invoke(app, ["eval", str(tiny_dir), "--task", "hellaswag", "--data", str(f)])
    assert r.exit_code == 2 and "line 2" in r.output


def test_missing_model_and_missing_formats_module(tiny_dir, monkeypatch):
    r = runner.invoke(app, ["eval", "/no/such/model", "--task", "wikitext2"])
    assert r.exit_code == 2 and "no model at" in r.output
    import joules

    # as if joules.formats were not installed: the import raises ImportError
    monkeypatch.setitem(sys.modules, "joules.formats", None)
    monkeypatch.delattr(joules, "formats", raising=False)
    r = runner.invoke(
        app, ["eval", str(tiny_dir), "--task", "deviation", "--weights-format", "mxfp4"]
    )
    assert r.exit_code == 2 and "needs joules.formats" in r.output


def test_weights_format_goes_through_formats_fake_quant(tiny_dir, monkeypatch):
    import types

    import torch

    calls = []

    class Bf16:
        name = "bf16-test"

        def fake_quant(self, t):
            calls.append(tuple(t.shape))
            return t.to(torch.bfloat16).float()

    fake = types.ModuleType("joules.formats")
    fake.get = lambda spec: Bf16()
    monkeypatch.setitem(sys.modules, "joules.formats", fake)
    import joules

    monkeypatch.setattr(joules, "formats", fake, raising=False)
    args = ["eval", str(tiny_dir), "--task", "deviation", "--weights-format", "bf16-test"]
    d = _json(runner.invoke(app, [*args, "--limit-tokens", "100", "--window", "50", "--json"]))
    assert len(calls) == 14  # 2 layers x 7 linear weights; the head is left alone
    assert d["protocol"]["transform"] == "bf16-test (emulated fake_quant)"
    assert 0 < d["kl_mean"] < 1e-3 and d["top1_agreement"] > 0.9


def test_deviation_bf16_with_a_format_labels_its_reference_bf16(tiny_dir):
    # the reference is MODEL itself as loaded (bf16): the label must not say fp32
    args = ["eval", str(tiny_dir), "--task", "deviation", "--weights-format", "int8"]
    opts = ["--dtype", "bf16", "--limit-tokens", "64", "--window", "32", "--sqnr", "none"]
    d = _json(runner.invoke(app, [*args, *opts, "--json"]))
    assert d["protocol"]["reference"] == f"{tiny_dir} (bf16)"
    assert "(fp32)" not in d["protocol"]["reference"]


@pytest.mark.parametrize("bf16_s", [0.5, 4.0])
def test_default_dtype_is_fp32_whatever_the_probe_says(tiny_dir, tmp_path, monkeypatch, bf16_s):
    # quality figures never depend on a speed probe: bf16 fast (0.5 s) or slow (4 s), fp32 ran
    import joules.runtime_dtype as rd

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(rd, "probe", lambda repeats=7: (1.0, bf16_s))
    args = ["eval", str(tiny_dir), "--task", "wikitext2", "--limit-tokens", "64", "--window", "32"]
    d = _json(runner.invoke(app, [*args, "--json"]))
    assert d["protocol"]["dtype"] == "float32"
    assert d["protocol"]["dtype_choice"] == "fp32 (default)"
    assert d["protocol"]["compute_path"] == "dense/fp32 x15"


@pytest.mark.parametrize(("bf16_s", "want"), [(0.5, "bfloat16"), (4.0, "float32")])
def test_explicit_auto_follows_the_probe_and_says_so(tiny_dir, tmp_path, monkeypatch, bf16_s, want):
    import joules.runtime_dtype as rd

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(rd, "probe", lambda repeats=7: (1.0, bf16_s))
    monkeypatch.setattr(rd, "machine_load", lambda: rd.MachineLoad(0.0, 0.0, 2))
    args = ["eval", str(tiny_dir), "--task", "wikitext2", "--limit-tokens", "64", "--window", "32"]
    d = _json(runner.invoke(app, [*args, "--dtype", "auto", "--json"]))
    assert d["protocol"]["dtype"] == want
    assert d["protocol"]["dtype_choice"].startswith("auto: bf16 matmul is")
