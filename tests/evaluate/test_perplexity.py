"""Perplexity: window planning, the uniform-logit identity, and agreement with a hand computation."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from joules.data import load_text
from joules.data.tokens import encode
from joules.errors import ConfigError
from joules.evaluate.perplexity import perplexity, plan_windows, tokenize_stream


class UniformLM(torch.nn.Module):
    """No decoder/head split: exercises the scorer's fallback path; logits are all zero."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.fixture(scope="module")
def uniform_tiny(tiny):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 -> uniform over the 384-token vocabulary
    return model


@pytest.mark.parametrize(("window", "stride"), [(32, 32), (32, 8), (50, 49), (7, 1)])
@pytest.mark.parametrize("add_bos", [False, True])
def test_uniform_logits_give_vocab_size(tiny, uniform_tiny, window, stride, add_bos):
    text = load_text("wikitext2", "test")
    for model, vocab in ((uniform_tiny, 384), (UniformLM(500), 500)):
        r = perplexity(
            model,
            tiny.tokenizer,
            text,
            window=window,
            stride=stride,
            limit_tokens=150,
            add_bos=add_bos,
        )
        assert r.perplexity == pytest.approx(vocab, rel=1e-5)
        assert r.tokens_scored == sum(w.scored for w in plan_windows(150, window, stride, add_bos))


def _hand_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Hugging Face's sliding-window recipe written out with plain cross-entropy (no BOS)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(x).logits[0]  # [T, V]
        new = end - max(prev_end, begin + 1)  # tokens not scored before
        ce = F.cross_entropy(logits[:-1][-new:], x[0, 1:][-new:], reduction="sum")
        total, count, prev_end = total + float(ce), count + new, end
        if end == len(ids):
            break
    return total / count


@pytest.mark.parametrize(("window", "stride", "batch"), [(64, 64, 1), (64, 16, 3), (100, 30, 2)])
def test_tiny_model_matches_exp_mean_cross_entropy(tiny, window, stride, batch):
    text = load_text("wikitext2", "test")
    ids = tokenize_stream(tiny.tokenizer, text, 300)
    r = perplexity(
        tiny.model,
        tiny.tokenizer,
        text,
        window=window,
        stride=stride,
        limit_tokens=300,
        batch_size=batch,
    )
    expected = _hand_nll(tiny.model, ids, window, stride)
    assert r.nll_mean == pytest.approx(expected, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny):
    text = load_text("wikitext2", "test")
    a = perplexity(
        tiny.model, tiny.tokenizer, text, window=64, stride=40, limit_tokens=333, batch_size=1
    )
    b = perplexity(
        tiny.model, tiny.tokenizer, text, window=64, stride=40, limit_tokens=333, batch_size=4
    )
    assert a.nll_mean == pytest.approx(b.nll_mean, rel=1e-6)
    assert a.tokens_scored == b.tokens_scored


def test_result_reports_protocol_interval_and_bytes(tiny):
    r = perplexity(
        tiny.model,
        tiny.tokenizer,
        load_text("wikitext2", "test"),
        window=64,
        limit_tokens=256,
        dataset="wikitext2",
        split="test",
    )
    p = r.protocol
    assert (p.window, p.stride, p.limit_tokens, p.stream_tokens, p.add_bos) == (
        64,
        64,
        256,
        256,
        False,
    )
    assert r.windows == 4 and r.tokens_scored == 252
    lo, hi = r.perplexity_ci95
    assert lo < r.perplexity < hi
    # byte tokenizer: one token per byte, so bits/byte == NLL / ln 2
    assert r.scored_bytes == 252
    assert r.bits_per_byte == pytest.approx(r.nll_mean / math.log(2))
    d = r.to_dict()
    assert d["protocol"]["dataset"] == "wikitext2" and d["perplexity"] == pytest.approx(
        r.perplexity
    )


def test_limit_tokens_is_a_deterministic_prefix(tiny):
    text = load_text("wikitext2", "test")[:20000]
    full = encode(tiny.tokenizer, text)
    assert tokenize_stream(tiny.tokenizer, text, 500) == full[:500]
    assert tokenize_stream(tiny.tokenizer, text, 10**9) == full


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 400),
    window=st.integers(2, 64),
    data=st.data(),
    add_bos=st.booleans(),
)
def test_windows_score_each_token_at_most_once_with_enough_context(n, window, data, add_bos):
    stride = data.draw(st.integers(1, window))
    windows = plan_windows(n, window, stride, add_bos)
    scored = [i for w in windows for i in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored))
    assert scored == sorted(scored)
    for w in windows:
        assert w.end - w.begin <= window
        assert w.score_from >= w.begin + (0 if add_bos else 1)
    if add_bos:
        assert scored == list(range(n))
    elif stride < window:
        assert scored == list(range(1, n))  # sliding: every token but the first
    else:  # non-overlapping without BOS: each window's first token is context only
        assert scored == [i for i in range(n) if i % window]


def test_bad_settings_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="stride"):
        plan_windows(100, 10, 11, False)
    with pytest.raises(ConfigError, match="window"):
        plan_windows(100, 1, 1, False)
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(tiny.model, tiny.tokenizer, "a", window=8)
    with pytest.raises(ConfigError, match="limit_tokens"):
        perplexity(tiny.model, tiny.tokenizer, "hello world", window=8, limit_tokens=0)


@pytest.mark.real_model
def test_default_model_perplexity_slice(smollm2):
    model, tok, _ = smollm2
    r = perplexity(model, tok, load_text("wikitext2", "test"), window=256, limit_tokens=512)
    assert r.protocol.add_bos is False  # SmolLM2's GGUF tokenizer adds no BOS
    assert r.tokens_scored == 510
    assert 5 < r.perplexity < 60  # a trained model, far from the 49,152 of a uniform guess


def test_paired_difference_on_same_windows():
    from joules.evaluate.paired import paired_difference
    from joules.evaluate.perplexity import perplexity
    from joules.models import tiny_model

    model, tok, _ = tiny_model("llama", seed=0)
    other, _, _ = tiny_model("llama", seed=1)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    a = perplexity(model, tok, text, window=64)
    b = perplexity(other, tok, text, window=64)
    assert len(a.window_nll_sums) == a.windows and sum(a.window_tokens) == a.tokens_scored
    d = paired_difference(a, b)
    assert abs(d.delta_nll - (a.nll_mean - b.nll_mean)) < 1e-9
    assert d.delta_nll_stderr > 0
    same = paired_difference(a, a)
    assert same.delta_nll == 0 and same.ppl_ratio == 1 and not same.significant
    c = perplexity(model, tok, text, window=32)
    with pytest.raises(ConfigError, match="same windows"):
        paired_difference(a, c)
