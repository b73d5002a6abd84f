"""Deviation: KL of a model against itself is 0, KL matches a hand computation, SQNR finds layers."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from joules.data import load_text
from joules.errors import ConfigError
from joules.evaluate.deviation import (
    deviation,
    format_transform,
    quantizable_linears,
    round_to,
    transformed_copy,
)
from joules.models import tiny_model


@pytest.fixture(scope="module")
def text():
    return load_text("wikitext2", "test")


def test_kl_of_a_model_against_itself_is_zero(tiny, text):
    r = deviation(tiny.model, tiny.model, tiny.tokenizer, text, window=64, limit_tokens=200)
    assert r.kl_mean == 0 and r.kl_max == 0 and r.kl_p99 == 0
    assert r.top1_agreement == 1.0 and r.perplexity_ratio == 1.0
    assert all(s.sqnr_db == float("inf") for s in r.layers)
    assert [s.name for s in r.layers] == [n for n, _ in quantizable_linears(tiny.model)]


def test_bf16_rounding_deviates_a_little(tiny, text):
    test = transformed_copy(tiny.model, round_to(torch.bfloat16))
    r = deviation(test, tiny.model, tiny.tokenizer, text, window=64, limit_tokens=256)
    assert 0 < r.kl_median <= r.kl_p99 <= r.kl_max < 1e-3
    assert r.top1_agreement > 0.9
    assert r.perplexity_ratio == pytest.approx(1.0, abs=1e-3)
    worst = r.worst_layers(1)[0]
    assert 20 < worst.sqnr_db < 80  # bf16 has 8 mantissa bits: ~50 dB, less after accumulation
    blocks = deviation(
        test, tiny.model, tiny.tokenizer, text, window=64, limit_tokens=128, sqnr_modules="block"
    ).layers
    assert [s.name for s in blocks] == ["model.layers.0", "model.layers.1"]


def test_kl_and_top1_match_a_hand_computation(tiny, text):
    other = tiny_model("llama", seed=1).model
    ids = tiny.tokenizer(text[:200], add_special_tokens=False).input_ids[:40]
    r = deviation(other, tiny.model, tiny.tokenizer, ids, window=40, sqnr_modules="none")
    x = torch.tensor([ids])
    with torch.no_grad():
        lp_ref = torch.log_softmax(tiny.model(x).logits[0, :-1].double(), -1)
        lp_test = torch.log_softmax(other(x).logits[0, :-1].double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_test)).sum(-1)
    assert r.tokens_scored == 39
    assert r.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    agree = (lp_ref.argmax(-1) == lp_test.argmax(-1)).double().mean()
    assert r.top1_agreement == pytest.approx(float(agree))
    nll_ref = -lp_ref.gather(1, x[0, 1:, None])[:, 0].mean()
    assert r.nll_reference == pytest.approx(float(nll_ref), rel=1e-5)
    assert r.layers == []


def test_transformed_copy_leaves_the_original_alone(tiny):
    before = tiny.model.model.layers[0].mlp.up_proj.weight.clone()
    test = transformed_copy(tiny.model, lambda w: torch.zeros_like(w))
    assert torch.equal(tiny.model.model.layers[0].mlp.up_proj.weight, before)
    assert test.model.layers[0].mlp.up_proj.weight.abs().sum() == 0
    assert torch.equal(test.lm_head.weight, tiny.model.lm_head.weight)  # the head is not a target
    with pytest.raises(ConfigError, match="shape"):
        transformed_copy(tiny.model, lambda w: w[:1])


def test_weights_format_without_formats_module_is_a_clear_error(monkeypatch):
    import joules

    # as if joules.formats were not installed: the import raises ImportError
    monkeypatch.setitem(sys.modules, "joules.formats", None)
    monkeypatch.delattr(joules, "formats", raising=False)
    with pytest.raises(ConfigError, match=r"mxfp4 needs joules\.formats"):
        format_transform("mxfp4")


def test_vocabulary_mismatch_is_a_config_error(tiny, text):
    wide = tiny_model("llama", seed=0, vocab_size=416).model
    with pytest.raises(ConfigError, match="vocabulary"):
        deviation(wide, tiny.model, tiny.tokenizer, text, window=32, limit_tokens=40)


def test_a_real_format_from_the_formats_module(tiny, text):
    pytest.importorskip("joules.formats")
    r4 = deviation(
        transformed_copy(tiny.model, format_transform("int4-g32")),
        tiny.model,
        tiny.tokenizer,
        text,
        window=64,
        limit_tokens=128,
    )
    r8 = deviation(
        transformed_copy(tiny.model, format_transform("int8-ch")),
        tiny.model,
        tiny.tokenizer,
        text,
        window=64,
        limit_tokens=128,
    )
    assert 0 < r8.kl_mean < r4.kl_mean  # fewer bits, more deviation
    assert r8.worst_layers(1)[0].sqnr_db > r4.worst_layers(1)[0].sqnr_db
    with pytest.raises(ConfigError, match="bogus"):  # the formats module's own message
        format_transform("int5-bogus")


def test_kl_is_finite_where_the_reference_gives_a_token_zero_probability(tiny, text, monkeypatch):
    # A reference whose log-prob of token 0 is -inf (a masked vocabulary entry), on both models:
    # p·(log p - log q) is 0·(-inf + inf) = nan there; KL's convention 0·log 0 = 0 gives 0.
    from joules.evaluate.scoring import Scorer

    plain = Scorer.logprob_chunks

    def masked(self, rows):
        for lp in plain(self, rows):
            lp = lp.clone()
            lp[:, 0] = float("-inf")
            yield torch.log_softmax(lp, -1)

    monkeypatch.setattr(Scorer, "logprob_chunks", masked)
    test = transformed_copy(tiny.model, round_to(torch.bfloat16))
    r = deviation(test, tiny.model, tiny.tokenizer, text, window=64, limit_tokens=128)
    assert 0 < r.kl_mean < 1e-3 and r.kl_max < 1e-2  # finite, and as small as without the mask


def test_kl_rows_matches_the_definition_and_handles_zero_probability():
    from joules.evaluate.deviation import kl_rows

    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_rows(p.log(), q.log())[0]) == pytest.approx(want, rel=1e-6)
    # the model puts 0 where the reference does not: KL is infinite, not nan
    ref = torch.tensor([[0.5, 0.25, 0.25]])
    assert float(kl_rows(ref.log(), p.log())[0]) == float("inf")
