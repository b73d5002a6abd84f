"""KL divergence statistics are made group by group: whatever chunks a source hands over, the
store and the figures are the ones of whole windows, bit for bit; a stored reference is read
from its file a group at a time."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from joules.data import load_text
from joules.evaluate.kld import (
    TokenProtocol,
    TorchLogits,
    kl_divergence,
    quantize_logprobs,
    reference_logprobs,
    stored_kl_terms,
)
from joules.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def text():
    return load_text("wikitext2", "test")[:20000]


class Whole:
    """A source with ``logprobs`` only: each window's ``[n, V]`` at once."""

    def __init__(self, src: TorchLogits) -> None:
        self.src, self.name, self.vocab_size = src, src.name, src.vocab_size

    def compute_path(self) -> str:
        return self.src.compute_path()

    def activations(self) -> str:
        return self.src.activations()

    def logprobs(self, row, *, first=0):
        return self.src.logprobs(row, first=first)


class Irregular(Whole):
    """The same log-probs handed over in chunks of 1, 5, 130, 2 and 64 rows, in turn."""

    def logprobs(self, row, *, first=0):
        return self.src.logprobs(row, first=first)

    def logprob_chunks(self, row, *, first=0, stop=None):
        lp = self.logprobs(row, first=first)[: (len(row) if stop is None else stop) - first]
        sizes, at = itertools.cycle([1, 5, 130, 2, 64]), 0
        while at < len(lp):
            n = next(sizes)
            yield lp[at : at + n]
            at += n


def test_groups_give_the_whole_windows_arithmetic():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(300, 1000, generator=g) * 8, dim=-1)
    q, scale, low = quantize_logprobs(lp)
    parts = [quantize_logprobs(lp[s : s + 128]) for s in range(0, 300, 128)]
    assert np.array_equal(q, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(scale, np.concatenate([p[1] for p in parts]))
    assert np.array_equal(low, np.concatenate([p[2] for p in parts]))
    other = torch.log_softmax(torch.randn(300, 1000, generator=g) * 8, dim=-1)
    whole = stored_kl_terms(q, scale, low, other)
    groups = [
        stored_kl_terms(q[s : s + 128], scale[s : s + 128], low[s : s + 128], other[s : s + 128])
        for s in range(0, 300, 128)
    ]
    assert torch.equal(whole, torch.cat(groups))


def _result(r):
    return dataclasses.replace(r, duration_s=0.0)


@pytest.mark.parametrize(("scored", "window"), [("all", 300), ("second-half", 512)])
def test_irregular_chunks_give_the_whole_windows_figures(tiny, text, scored, window):
    ref_src = TorchLogits(tiny.model)
    test_src = TorchLogits(tiny_model("llama", seed=1).model)
    p = TokenProtocol(window=window, scored=scored, limit_tokens=1400)
    a = reference_logprobs(Whole(ref_src), tiny.tokenizer, text, p)
    b = reference_logprobs(Irregular(ref_src), tiny.tokenizer, text, p)
    for name in a.ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    want = kl_divergence(Whole(test_src), a)
    assert _result(kl_divergence(Irregular(test_src), a)) == _result(want)
    assert _result(kl_divergence(test_src, a)) == _result(want)  # TorchLogits' own chunks


def test_a_stored_reference_is_read_a_group_at_a_time(tiny, text, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    src = TorchLogits(tiny.model)
    p = TokenProtocol(window=200, scored="all", limit_tokens=700)
    mem = reference_logprobs(src, tiny.tokenizer, text, p)
    stored = reference_logprobs(src, tiny.tokenizer, text, p, key="tiny seed 0")
    assert isinstance(stored.steps, np.memmap) and stored.path is not None
    assert np.array_equal(stored.step_rows(3, 150), mem.steps[3:150])
    assert np.array_equal(np.asarray(stored.steps), mem.steps)  # written through the file
    other = TorchLogits(tiny_model("llama", seed=1).model)
    r_mem, r_stored = kl_divergence(other, mem), kl_divergence(other, stored)
    fields = ("kl_mean", "kl_max", "kl_median", "window_kl_sums", "top1_agreement")
    assert [getattr(r_mem, f) for f in fields] == [getattr(r_stored, f) for f in fields]
