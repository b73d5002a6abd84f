"""KL divergence through llama.cpp: its log-probs equal torch's on an exported file, a file
against itself is 0, the figures match the torch path, and ``joules eval --runtime llamacpp``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp")

from joules.data import load_text
from joules.deploy.llamacpp_logits import LlamaCppLogits, llamacpp_kl_divergence
from joules.errors import ConfigError
from joules.evaluate import tasks
from joules.evaluate.kld import (
    TokenProtocol,
    TorchLogits,
    kl_divergence,
    logit_source,
    reference_logprobs,
    runtime_names,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama as an F32 GGUF and as joules' RTN Q4_0 export, with their torch models."""
    from joules.compress import compress
    from joules.deploy import export_gguf
    from joules.models import load_model, save_tiny_model

    d = tmp_path_factory.mktemp("kld")
    save_tiny_model(d / "t", "llama", seed=0)
    export_gguf(d / "t", d / "f32.gguf")
    base = load_model(d / "t")
    compress(load_model(d / "t").model, "rtn(format=gguf-q4_0)").save(d / "c", base.tokenizer)
    export_gguf(d / "c", d / "q4_0.gguf")
    return d, base, load_model(d / "c")


@pytest.fixture(scope="module")
def text():
    return load_text("wikitext2", "test")


def test_llamacpp_log_probs_equal_torch_on_the_exported_file(files, text):
    d, base, _ = files
    ids = base.tokenizer(text[:2000], add_special_tokens=False).input_ids[:100]
    got = LlamaCppLogits(d / "f32.gguf", n_ctx=128, threads=1).logprobs(ids, first=10)
    want = TorchLogits(base.model).logprobs(ids, first=10)
    assert got.shape == want.shape == (90, base.model.config.vocab_size)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-3  # two runtimes' float32 arithmetic, same weights


def test_a_file_against_itself_is_zero_and_a_q4_file_matches_the_torch_path(files, text):
    d, base, q4 = files
    p = TokenProtocol(window=128, scored="second-half", limit_tokens=768)
    ref = reference_logprobs(LlamaCppLogits(d / "f32.gguf", n_ctx=128, threads=1), base.tokenizer,
                             text, p)  # fmt: skip
    same = llamacpp_kl_divergence(d / "f32.gguf", ref, threads=1)
    assert same.kl_max == 0 and same.top1_agreement == 1 and same.perplexity_ratio == 1
    assert same.protocol.runtime == same.protocol.reference_runtime == "llamacpp"
    got = llamacpp_kl_divergence(d / "q4_0.gguf", ref, threads=1)
    # the same comparison in torch: the Q4_0 model decoded against the fp32 one
    torch_ref = reference_logprobs(TorchLogits(base.model), base.tokenizer, text, p)
    want = kl_divergence(TorchLogits(q4.model), torch_ref)
    assert got.tokens_scored == want.tokens_scored == 6 * 63
    assert want.kl_mean > 0 and got.kl_mean == pytest.approx(want.kl_mean, rel=0.05)
    assert got.perplexity_ratio == pytest.approx(want.perplexity_ratio, rel=1e-3)
    # a reference file given by path: computed here, same figures
    by_path = llamacpp_kl_divergence(d / "q4_0.gguf", d / "f32.gguf", base.tokenizer, text, p,
                                     threads=1)  # fmt: skip
    assert by_path.kl_mean == got.kl_mean and by_path.window_tokens == got.window_tokens


def test_the_llamacpp_runtime_is_registered_and_takes_gguf_files_only(files):
    d, base, _ = files
    assert "llamacpp" in runtime_names()
    with pytest.raises(ConfigError, match=r"runs \.gguf files"):
        logit_source("llamacpp", base.model, n_ctx=64)
    with pytest.raises(ConfigError, match="does not fit the context"):
        LlamaCppLogits(d / "f32.gguf", n_ctx=16, threads=1).logprobs(list(range(40)))


def test_deviation_task_on_files_stores_the_reference_once(files, text, tmp_path, monkeypatch):
    d, base, _ = files
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    opts = dict(window=128, limit_tokens=512, scored="second-half", threads=1)
    r = tasks.run_task("deviation", str(d / "q4_0.gguf"), base.tokenizer, None,
                       runtime="llamacpp", reference=str(d / "f32.gguf"), **opts)  # fmt: skip
    assert r.kl_mean > 0 and r.protocol.reference_runtime == "llamacpp"
    assert len(list((tmp_path / "kld-base").iterdir())) == 1
    # a Hugging Face directory as the reference runs in torch fp32: its own store
    r2 = tasks.run_task("deviation", str(d / "q4_0.gguf"), base.tokenizer, None,
                        runtime="llamacpp", reference=str(d / "t"), **opts)  # fmt: skip
    assert r2.protocol.reference_runtime == "torch"
    assert r2.kl_mean == pytest.approx(r.kl_mean, rel=0.05)
    again = tasks.run_task("deviation", str(d / "q4_0.gguf"), base.tokenizer, None,
                           runtime="llamacpp", reference=str(d / "f32.gguf"), **opts)  # fmt: skip
    assert again.kl_mean == r.kl_mean and len(list((tmp_path / "kld-base").iterdir())) == 2
    with pytest.raises(ConfigError, match="use runtime=torch"):
        tasks.run_task("deviation", str(d / "q4_0.gguf"), base.tokenizer, None,
                       runtime="llamacpp", weights_format="int8", **opts)  # fmt: skip


def test_cli_eval_deviation_runtime_llamacpp(files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from joules.cli import app

    d, _, _ = files
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    args = ["--task", "deviation", "--reference", str(d / "f32.gguf"), "--runtime", "llamacpp",
            "--scored", "second-half", "--window", "128", "--limit-tokens", "512",
            "--threads", "1"]  # fmt: skip
    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(d / "q4_0.gguf"), *args, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["tokens_scored"] == 4 * 63 and res["kl_lo"] < res["kl_mean"] < res["kl_hi"]
    text = runner.invoke(app, ["eval", str(d / "q4_0.gguf"), *args])
    assert text.exit_code == 0, text.output
    for line in ("Mean    KLD", "99.0%   KLD", "Median  KLD", "Same top p", "PPL(Q)/PPL(base)"):
        assert line in text.output
    bad = runner.invoke(app, ["eval", str(d / "c"), *args])
    assert bad.exit_code == 2 and "needs a .gguf file" in bad.output
