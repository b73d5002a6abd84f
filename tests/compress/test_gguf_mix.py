"""gguf_mix: GGUF types per tensor under a byte budget, chosen by Fisher-weighted error."""

from __future__ import annotations

import pytest
import torch

from joules.compress import calibration_tokens, compress, parse_recipe
from joules.errors import ConfigError
from joules.models import tiny_model

KW = dict(hidden_size=256, intermediate_size=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = tiny_model("llama", seed=0, **KW)
    return calibration_tokens(tok, n=2, length=32)[0]


def _mix(budget, calib, **kw):
    m, _, _ = tiny_model("llama", seed=0, **KW)
    cands = kw.pop("candidates", None)
    args = f"bytes={budget}" + (f", candidates=[{', '.join(cands)}]" if cands else "")
    cm = compress(m, f"gguf_mix({args})", calibration=calib)
    return cm, m


def test_budget_is_kept_and_more_bytes_buy_less_error(calib):
    small, _ = _mix(800_000, calib, candidates=["gguf-q8_0", "gguf-q4_0"])
    large, _ = _mix(1_100_000, calib, candidates=["gguf-q8_0", "gguf-q4_0"])
    a, b = small.manifest.gguf_export["mix"], large.manifest.gguf_export["mix"]
    assert a["bytes"] <= 800_000 < b["bytes"] <= 1_100_000
    assert set(a["types"]) | set(b["types"]) <= {"gguf-q8_0", "gguf-q4_0"}
    assert b["types"].get("gguf-q8_0", 0) > a["types"].get("gguf-q8_0", 0)
    # the packed linears plus the embedding in its recorded type are what was budgeted
    from joules import formats
    from joules.compress.modules.linear import compressed_linears

    for cm, mix in ((small, a), (large, b)):
        packed = sum(m.qtensor().nbytes for m in compressed_linears(cm.model).values())
        emb = formats.get(mix["embedding"]).total_bits((384, 256)) // 8
        assert packed + emb == mix["bytes"]
        assert cm.manifest.gguf_export["embedding"] == mix["embedding"]
        layers = cm.manifest.layers.values()
        assert all(v["method"] == "gptq" for v in layers)


def test_budget_below_the_smallest_choice_is_one_line(calib):
    with pytest.raises(ConfigError, match="smallest choice of these types takes"):
        _mix(10_000, calib)
    with pytest.raises(ConfigError, match="gguf-\\* types"):
        parse_recipe("gguf_mix(bytes=1000, candidates=[int4-g32, gguf-q4_0])").steps[0].validate()


def test_options_are_measured_once_per_question(calib, monkeypatch):
    """Two budgets of the same weights, calibration and candidates measure the options once
    (a sweep's target_size axis); other weights or candidates measure afresh; the reused
    options give the same files as fresh ones."""
    from joules.compress.steps import gguf_mix
    from joules.compress.steps.mixed import Mixed

    cands = ["gguf-q8_0", "gguf-q4_0"]
    calls = []
    real = Mixed._collect
    monkeypatch.setattr(Mixed, "_collect", lambda self, *a: calls.append(1) or real(self, *a))
    gguf_mix._MEASURED.clear()
    a, _ = _mix(900_000, calib, candidates=cands)
    b, _ = _mix(1_000_000, calib, candidates=cands)
    assert len(calls) == 1 and len(gguf_mix._MEASURED) == 1
    gguf_mix._MEASURED.clear()
    fresh, _ = _mix(1_000_000, calib, candidates=cands)
    assert len(calls) == 2
    assert b.manifest.gguf_export["mix"] == fresh.manifest.gguf_export["mix"]
    mine, theirs = b.model.state_dict(), fresh.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    _mix(1_000_000, calib, candidates=[*cands, "gguf-q5_0"])  # another question
    assert len(calls) == 3
    m, _, _ = tiny_model("llama", seed=1, **KW)  # other weights
    compress(m, f"gguf_mix(bytes=1000000, candidates=[{', '.join(cands)}])", calibration=calib)
    assert len(calls) == 4 and len(gguf_mix._MEASURED) == gguf_mix._KEEP
    assert a.manifest.gguf_export["mix"]["bytes"] <= 900_000
