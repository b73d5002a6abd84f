"""Multiple choice: the KV-reuse path equals the plain path, parsing, sampling and scoring rules."""

from __future__ import annotations

import json

import pytest
import torch

from joules.data import ChoiceItem, load_choice
from joules.errors import DataError
from joules.evaluate.choice import (
    ChoiceScorer,
    choice_accuracy,
    choose,
    encode_pair,
    select_items,
)


def test_hellaswag_parses_10042_items_with_labels_0_to_3():
    items = load_choice("hellaswag")
    assert len(items) == 10042
    assert {it.label for it in items} == {0, 1, 2, 3}
    assert all(len(it.endings) == 4 and it.context for it in items)


@pytest.mark.parametrize("add_bos", [False, True])
def test_kv_cache_reuse_matches_plain_scoring(tiny, add_bos):
    items = load_choice("hellaswag")[:6]
    kv = ChoiceScorer(tiny.model, tiny.tokenizer, add_bos=add_bos, kv_reuse=True)
    plain = ChoiceScorer(tiny.model, tiny.tokenizer, add_bos=add_bos, kv_reuse=False)
    assert kv.kv_reuse and not plain.kv_reuse
    for it in items:
        assert kv.scores(it) == pytest.approx(plain.scores(it), rel=1e-5, abs=1e-4)


def test_score_is_sum_of_ending_token_logprobs(tiny):
    item = ChoiceItem("The cat", ("sat.", "ran away quickly."), 0)
    scores = ChoiceScorer(tiny.model, tiny.tokenizer).scores(item)
    for ending, got in zip(item.endings, scores, strict=True):
        ctx, cont = encode_pair(tiny.tokenizer, item.context, " " + ending)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(ids).logits[0].double(), -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert got == pytest.approx(want, rel=1e-5)


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny):
    ctx, cont = encode_pair(tiny.tokenizer, "abc ", "def")
    assert tiny.tokenizer.decode(ctx) == "abc"
    assert tiny.tokenizer.decode(cont) == " def"  # one token per byte, the space included


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes(tiny, monkeypatch):
    # "ééééé" is 5 characters but 10 UTF-8 bytes: per character ending 1 wins, per byte ending 0
    item = ChoiceItem("x", ("ééééé", "abcdefg"), 1)
    monkeypatch.setattr(ChoiceScorer, "scores", lambda self, it: [-5.0, -6.0])
    r = choice_accuracy(tiny.model, tiny.tokenizer, [item])
    assert (r.predictions, r.predictions_norm, r.predictions_bytes) == ([0], [1], [0])
    assert (r.acc, r.acc_norm, r.acc_bytes) == (0.0, 1.0, 0.0)


def test_ties_go_to_the_first_ending_as_numpy_argmax():
    assert choose([-1.0, -1.0, -2.0], ["ab", "ab", "ab"]) == (0, 0, 0)


def test_hellaswag_protocol_states_its_text(tiny):
    r = choice_accuracy(tiny.model, tiny.tokenizer, load_choice("hellaswag"), limit=2)
    assert "llama.cpp's HellaSwag text" in r.protocol.text
    assert "ctx_b not capitalised" in r.protocol.text
    assert "characters" in r.protocol.scoring and "acc_bytes" in r.to_dict()


def test_limit_draws_a_fixed_seeded_sample():
    a = select_items(10042, 50, seed=1234)
    assert a == select_items(10042, 50, seed=1234) and a == sorted(a) and len(set(a)) == 50
    assert a != select_items(10042, 50, seed=1)
    assert select_items(5, None, 0) == [0, 1, 2, 3, 4] and select_items(5, 9, 0) == [0, 1, 2, 3, 4]


def test_result_has_wilson_intervals_and_protocol(tiny):
    r = choice_accuracy(tiny.model, tiny.tokenizer, load_choice("hellaswag"), limit=8, seed=3)
    assert r.n == 8 and r.protocol.limit == 8 and r.protocol.seed == 3
    lo, hi = r.acc_norm_ci95
    assert 0 <= lo <= r.acc_norm <= hi <= 1
    assert set(r.to_dict()) >= {"acc", "acc_norm", "acc_ci95", "acc_norm_ci95", "protocol"}


def test_user_jsonl_and_malformed_line_names_the_line(tmp_path, tiny):
    good = tmp_path / "mine.jsonl"
    good.write_text(
        json.dumps({"context": "One plus one is", "endings": ["two.", "a fish."], "label": 0})
        + "\n"
    )
    r = choice_accuracy(tiny.model, tiny.tokenizer, load_choice(str(good)), dataset=str(good))
    assert r.n == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n")
    with pytest.raises(DataError, match="line 2"):
        load_choice(str(bad))


@pytest.mark.real_model
def test_default_model_kv_reuse_matches_plain(smollm2):
    model, tok, _ = smollm2
    item = load_choice("hellaswag")[0]
    kv = ChoiceScorer(model, tok, kv_reuse=True).scores(item)
    plain = ChoiceScorer(model, tok, kv_reuse=False).scores(item)
    assert kv == pytest.approx(plain, rel=1e-4, abs=1e-3)
