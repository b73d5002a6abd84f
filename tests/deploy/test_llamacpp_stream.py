"""llama.cpp evaluation without a tokens x vocabulary matrix: the logits are read batch by batch
from llama.cpp's output buffer and reduced a few rows at a time, with the very numbers the whole
matrix gave (the old arithmetic is the reference here); a GGUF's tokenizer and facts come from
its metadata, nothing dequantized; a large model runs in llama.cpp when no runtime is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("llama_cpp")

from joules.cli import app
from joules.data import load_text
from joules.deploy import llamacpp
from joules.deploy.llamacpp import load_llama
from joules.deploy.llamacpp_logits import LlamaCppLogits
from joules.models import load_model
from joules.models.loading import load_gguf_meta

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama compressed to Q4_0 (vocabulary 384) and its GGUF export, embedding and head
    as the runtime choice exports them."""
    from joules.compress import compress
    from joules.deploy import export_gguf
    from joules.models import tiny_model

    d = tmp_path_factory.mktemp("stream")
    m, tok, _ = tiny_model("llama", seed=0)
    compress(m, "rtn(format=gguf-q4_0)").save(d / "c", tok)
    export_gguf(d / "c", d / "q.gguf", embedding="gguf-q6_k", output_head="gguf-q6_k")
    return d


def _scores(path, tokens):
    """Every position's logits as llama-cpp-python keeps them with ``logits_all``: the
    ``[n_ctx, V]`` copy the evaluation read before."""
    llm = load_llama(path, n_ctx=len(tokens), threads=1, logits_all=True)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def _old_window_nll(scores, tokens, score_from):
    """The window NLL as it was computed: the whole [T - 1, V] float64 matrix at once."""
    logits = np.asarray(scores[: len(tokens) - 1], dtype=np.float64)
    tgt = np.asarray(tokens[1:])
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    nll = lse - logits[np.arange(len(tgt)), tgt]
    return float(nll[score_from - 1 :].sum())


@pytest.mark.parametrize("rows", [64, 7, 1])
def test_window_nll_is_the_whole_matrix_one_bit_for_bit(files, rows, monkeypatch):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 384, 1100).tolist()  # three llama.cpp batches of up to 512
    scores = _scores(files / "q.gguf", tokens)
    monkeypatch.setattr(llamacpp, "_NLL_ROWS", rows)
    llm = load_llama(files / "q.gguf", n_ctx=len(tokens), threads=1)
    for score_from in (1, 300, 1099):
        got, n = llamacpp._window_nll(llm, tokens, score_from)
        assert got == _old_window_nll(scores, tokens, score_from)
        assert n == len(tokens) - score_from


def test_log_prob_chunks_are_the_whole_rows_log_softmax_bit_for_bit(files):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 384, 700).tolist()
    want = torch.log_softmax(torch.from_numpy(_scores(files / "q.gguf", tokens)[10:]), dim=-1)
    src = LlamaCppLogits(files / "q.gguf", n_ctx=700, threads=1)
    chunks = list(src.logprob_chunks(tokens, first=10, stop=650))
    assert max(len(c) for c in chunks) <= 128 and len(chunks) > 4
    assert torch.equal(torch.cat(chunks), want[:640])
    assert torch.equal(src.logprobs(tokens, first=10), want)


def test_gguf_tokenizer_and_facts_without_dequantizing(files):
    text = load_text("wikitext2", "test")[:5000]
    meta, full = load_gguf_meta(files / "q.gguf"), load_model(files / "q.gguf")
    assert all(p.is_meta for p in meta.model.parameters())
    assert meta.info.to_dict() == full.info.to_dict()
    a = meta.tokenizer(text, add_special_tokens=False).input_ids
    assert a == full.tokenizer(text, add_special_tokens=False).input_ids
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(meta.tokenizer, attr) == getattr(full.tokenizer, attr)


def test_a_large_model_runs_in_llamacpp_and_says_so(files, tmp_path, monkeypatch):
    from joules.deploy import runtime_choice

    d = files
    args = ["eval", str(d / "c"), "--task", "wikitext2", "--limit-tokens", "96", "--window", "32"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert "llama.cpp" not in r.stderr  # 0.0B parameters: torch
    assert json.loads(r.stdout)["protocol"]["compute_path"].startswith("dense")
    monkeypatch.setattr(runtime_choice, "LARGE_PARAMS", 1000)
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert (
        len(lines) == 1
        and "through llama.cpp" in lines[0]
        and "GGUF export" in lines[0]
        and "Q6_K" in lines[0]
    )
    got = json.loads(r.stdout)
    assert got["protocol"]["compute_path"].startswith("llamacpp:")
    assert len(list((tmp_path / "cache" / "gguf").glob("*.gguf"))) == 1  # kept for next time
    # the same perplexity as the file exported by hand with the same types
    r2 = runner.invoke(
        app, ["eval", str(d / "q.gguf"), *args[2:], "--runtime", "llamacpp", "--json"]
    )
    assert json.loads(r2.stdout)["nll_mean"] == got["nll_mean"]
    # --runtime torch forces torch, without the line
    r = runner.invoke(app, [*args, "--runtime", "torch", "--json"])
    assert "llama.cpp" not in r.stderr
    assert json.loads(r.stdout)["protocol"]["compute_path"].startswith("dense")
    r = runner.invoke(app, ["export", str(d / "c"), "-o", str(d / "x.gguf"), "--json"])
    assert r.exit_code == 0 and "tensor by tensor" in r.stderr


def test_bench_of_a_large_model_runs_in_llamacpp(files, monkeypatch):
    from joules.deploy import runtime_choice

    monkeypatch.setattr(runtime_choice, "LARGE_PARAMS", 1000)
    args = ["bench", str(files / "c"), "--prompt-len", "8", "--gen-len", "4", "--repeats", "1"]
    r = runner.invoke(app, [*args, "--warmup", "0", "--no-energy", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["runtime"] == "llamacpp"
    assert "through llama.cpp" in r.stderr
