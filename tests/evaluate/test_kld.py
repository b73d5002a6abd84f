"""KL divergence from a stored reference: 0 for a model against itself, a direct float64
computation within the derived uint16 storage error, llama.cpp's store, the protocols, the cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from joules.data import load_text
from joules.errors import ConfigError
from joules.evaluate import tasks
from joules.evaluate.kld import (
    CLIP_NATS,
    DROP_BELOW,
    LEVELS,
    ReferenceLogprobs,
    TokenProtocol,
    TorchLogits,
    decode_logprobs,
    kl_divergence,
    logit_source,
    plan_rows,
    quantize_logprobs,
    reference_logprobs,
)
from joules.evaluate.paired import t95
from joules.evaluate.results import DeviationResult
from joules.models import tiny_model

U32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def text():
    return load_text("wikitext2", "test")


class Sharpened(TorchLogits):
    """A tiny model's logits times ``gain``: peaked distributions whose log-probs span more
    than llama.cpp's 16-nat window (a random tiny model's span about 1 nat)."""

    def __init__(self, model, gain: float) -> None:
        super().__init__(model)
        self.gain = gain

    def logits(self, row: list[int], first: int) -> torch.Tensor:
        """The float32 logits this source's log-probs come from (the direct computation's
        input too: both take the head of the same hidden rows)."""
        with torch.inference_mode():
            hidden, _ = self.scorer.hidden(torch.tensor([row]), use_cache=False)
            return self.scorer.logits(hidden[0, first:]) * self.gain

    def logprobs(self, row, *, first=0):
        return torch.log_softmax(self.logits(row, first), dim=-1)


@pytest.mark.parametrize("scored", ["all", "second-half"])
def test_a_model_against_itself_is_exactly_zero(tiny, text, scored):
    src = TorchLogits(tiny.model)
    p = TokenProtocol(window=64, scored=scored, limit_tokens=300)
    ref = reference_logprobs(src, tiny.tokenizer, text, p)
    r = kl_divergence(src, ref)
    assert r.kl_mean == r.kl_max == r.kl_median == r.kl_p99 == 0.0
    assert (r.kl_lo, r.kl_hi) == (0.0, 0.0)
    assert r.top1_agreement == 1.0 and r.perplexity_ratio == 1.0
    assert (r.ppl_ratio_lo, r.ppl_ratio_hi) == (1.0, 1.0)
    # peaked distributions too (entries clipped by the 16-nat window)
    sharp = Sharpened(tiny.model, 40.0)
    assert kl_divergence(sharp, reference_logprobs(sharp, tiny.tokenizer, text, p)).kl_max == 0


def _direct_kl(ref_src: Sharpened, test_src: Sharpened, ids: list[int], window: int):
    """Per-token KL(ref || test) in float64 from the sources' float32 logits, llama-perplexity's
    rows built here from scratch (chunks of ``window``, no BOS, second half scored), and the
    derived bound on how far the stored-reference KL may be from it."""
    kls, bounds = [], []
    for c in range(len(ids) // window):
        row = ids[c * window : (c + 1) * window]
        first = window // 2  # logits at window//2 .. window-2 predict tokens window//2+1 ..
        lr = ref_src.logits(row, first)[:-1]
        lt = test_src.logits(row, first)[:-1]
        l64, m64 = torch.log_softmax(lr.double(), -1), torch.log_softmax(lt.double(), -1)
        p = l64.exp()
        kls.append((p * (l64 - m64)).sum(-1))
        # The bound, per token. (1) Storage: each stored log-prob is off by at most half a
        # step, e = scale/2 (plus the float32 rounding of scale*q + min), so the weight p^ =
        # exp(l^) is within a factor exp(e) of p; the stored correction removes the e·p^ term
        # llama.cpp's sum carries, leaving (exp(e) - 1) Σ p |l - m|. (2) Entries dropped (l^ <=
        # -16) miss their term p |l - m|. (3) float32: each log-prob comes out of log_softmax
        # with at most (log2 V + 4) roundings of magnitudes <= M (the pairwise sum over V, the
        # subtraction, the log), and each term takes 3 roundings (exp, subtract, multiply) in
        # both the sum and the stored correction.
        q, scale, low = quantize_logprobs(torch.log_softmax(lr, -1))
        dec = decode_logprobs(q, scale, low).double()
        e = torch.from_numpy(scale).double() / 2 + 2 * U32 * dec.abs().amax(-1)
        dropped = dec <= DROP_BELOW
        gap = (l64 - m64).abs()
        storage = (e.exp() - 1) * (p * gap).sum(-1)
        drop = (p * gap * dropped).sum(-1)
        v = lr.shape[-1]
        big = torch.maximum(l64.abs().amax(-1), m64.abs().amax(-1))
        fp32 = (2 * (math.log2(v) + 4) * U32 * big + 6 * U32 * (p * (gap + 1)).sum(-1)) * e.exp()
        bounds.append(storage + drop + fp32)
    return torch.cat(kls), torch.cat(bounds)


@pytest.mark.parametrize("gain", [1.0, 40.0])
def test_kl_equals_a_direct_float64_computation_within_the_storage_error(tiny, text, gain):
    other = tiny_model("llama", seed=1).model
    ref_src, test_src = Sharpened(tiny.model, gain), Sharpened(other, gain)
    ids = tiny.tokenizer(text[:3000], add_special_tokens=False).input_ids[:256]
    p = TokenProtocol(window=64, scored="second-half", add_bos=False)
    ref = reference_logprobs(ref_src, tiny.tokenizer, ids, p)
    if gain > 1:  # the 16-nat window really clips here
        assert (np.asarray(ref.steps) == 0).sum(-1).min() > 1
    r = kl_divergence(test_src, ref)
    want, bound = _direct_kl(ref_src, test_src, ids, 64)
    assert r.tokens_scored == want.numel() == 4 * 31
    # the per-token values are not kept: the window sums and extremes are what come out
    got_sums = torch.tensor(r.window_kl_sums, dtype=torch.float64)
    want_sums = want.view(4, 31).sum(-1)
    assert torch.all((got_sums - want_sums).abs() <= bound.view(4, 31).sum(-1))
    assert abs(r.kl_mean - float(want.mean())) <= float(bound.mean())
    assert abs(r.kl_max - float(want.max())) <= float(bound.max())
    assert r.kl_median == pytest.approx(float(np.median(want.numpy())), abs=float(bound.max()))
    assert want.mean() > 100 * bound.mean()  # the check has teeth: the bound is far below KL


def test_top1_and_perplexity_ratio_are_exact(tiny, text):
    other = tiny_model("llama", seed=1).model
    ids = tiny.tokenizer(text[:3000], add_special_tokens=False).input_ids[:200]
    p = TokenProtocol(window=100, scored="all", add_bos=False)
    ref_src, test_src = TorchLogits(tiny.model), TorchLogits(other)
    r = kl_divergence(test_src, reference_logprobs(ref_src, tiny.tokenizer, ids, p))
    x = torch.tensor([ids[:100], ids[100:]])
    with torch.no_grad():
        lr = torch.log_softmax(tiny.model(x).logits[:, :-1].double(), -1)
        lt = torch.log_softmax(other(x).logits[:, :-1].double(), -1)
    tgt = x[:, 1:, None]
    assert r.tokens_scored == 198 and r.window_tokens == [99, 99]
    assert r.nll_reference == pytest.approx(float(-lr.gather(2, tgt).mean()), rel=1e-6)
    assert r.nll_model == pytest.approx(float(-lt.gather(2, tgt).mean()), rel=1e-6)
    agree = (lr.argmax(-1) == lt.argmax(-1)).double().mean()
    assert r.top1_agreement == pytest.approx(float(agree))
    # the ratio's interval: paired per-window NLL differences, Student t with 1 df
    d = [a - b for a, b in zip(r.window_nll_sums, r.window_nll_reference_sums, strict=True)]
    mean = sum(d) / 198
    se = math.sqrt(2 * sum((x - 99 * mean) ** 2 for x in d)) / 198
    assert r.ppl_ratio_lo == pytest.approx(math.exp(mean - t95(1) * se), rel=1e-9)
    assert r.kl_hi - r.kl_mean == pytest.approx(t95(1) * r.kl_stderr, rel=1e-9)


def _llamacpp_store(logits: np.ndarray):
    """llama.cpp's ``log_softmax(n_vocab, logits, log_prob, tok)`` store, transcribed in numpy
    (tools/perplexity/perplexity.cpp): on the *logits*, float32."""
    logits = logits.astype(np.float32)
    mx = logits.max()
    mn = np.float32(max(logits.min(), mx - np.float32(16)))
    lse = np.float32(np.log(np.exp((logits - mx).astype(np.float64)).sum()))
    scale = np.float32((mx - mn) / np.float32(65535))
    if scale == 0:  # llama.cpp: memset(log_prob, 0, ...)
        return np.zeros(logits.shape, np.uint16), scale, np.float32(mn - mx - lse)
    q = np.where(logits > mn, np.rint((np.float32(1) / scale) * (logits - mn)), 0)
    return q.astype(np.uint16), scale, np.float32(mn - mx - lse)


def test_store_is_llamacpps_uint16_log_probs():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 1000)) * np.array([[0.1], [1], [3], [8], [20], [0]])).astype(
        np.float32
    )
    q, scale, low = quantize_logprobs(torch.log_softmax(torch.from_numpy(logits), -1))
    assert q.dtype == np.uint16 and scale.dtype == np.float32
    for i in range(6):
        want_q, want_scale, want_low = _llamacpp_store(logits[i])
        # computed on log-probs, not logits: the same steps up to one float32 rounding
        assert np.abs(q[i].astype(int) - want_q.astype(int)).max() <= 1
        assert scale[i] == pytest.approx(want_scale, rel=1e-5, abs=1e-12)
        assert low[i] == pytest.approx(want_low, rel=1e-5)
    assert scale[5] == 0 and (q[5] == 0).all()  # a flat row: llama.cpp's memset(0)
    assert q.max() == LEVELS and (q[4] == 0).sum() > 1  # the top entry; clipped entries -> 0
    dec = decode_logprobs(q, scale, low)
    lp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    kept = lp > lp.amax(-1, keepdim=True) - CLIP_NATS + 1e-3
    err = (dec.double() - lp).abs()[kept]
    assert err.max() <= float(scale.max()) / 2 + 1e-5  # half a step (and float32 rounding)


def test_plan_rows_follows_llama_perplexity():
    ids = list(range(10, 40))  # 30 tokens
    rows = plan_rows(ids, 8, "second-half", add_bos=True, bos_id=1)
    # the stream is [BOS] + ids (31 tokens): 3 chunks; each chunk's first token becomes BOS
    assert [r.tokens for r in rows] == [
        [1, *range(10, 17)],
        [1, *range(18, 25)],
        [1, *range(26, 33)],
    ]
    assert {r.score_from for r in rows} == {5} and rows[0].scored == 3  # 8 - 1 - 8 // 2
    rows = plan_rows(ids, 8, "second-half", add_bos=False, bos_id=None)
    assert len(rows) == 3 and rows[1].tokens == list(range(18, 26))
    rows = plan_rows(ids, 8, "all", add_bos=True, bos_id=1)  # BOS prepended, all scored
    assert rows[0].tokens == [1, *range(10, 18)] and rows[0].score_from == 1
    assert sum(r.scored for r in rows) == 30
    with pytest.raises(ConfigError, match="at least one chunk"):
        plan_rows(ids[:5], 8, "second-half", add_bos=False, bos_id=None)
    with pytest.raises(ConfigError, match="scored must be one of all, second-half"):
        TokenProtocol(scored="half")


def test_store_is_cached_memory_mapped_and_keyed(tiny, text, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    src = TorchLogits(tiny.model)
    p = TokenProtocol(window=64, scored="second-half", limit_tokens=256)
    ref = reference_logprobs(src, tiny.tokenizer, text, p, key="tiny/seed0 torch")
    assert ref.path is not None and ref.path.parent == tmp_path / "kld-base"
    assert isinstance(ref.steps, np.memmap) and not ref.steps.flags.writeable
    meta = json.loads((ref.path / "reference.json").read_text())
    assert meta["protocol"]["scored"] == "second-half" and meta["tokens"] == 256
    assert meta["tokens_scored"] == 4 * 31 and meta["key"] == "tiny/seed0 torch"
    v = tiny.model.config.vocab_size
    assert ref.bytes_per_token == 2 * v + 28  # uint16 per entry + scale, min, nll, top1, c
    # the same key, protocol and text: read back, nothing recomputed
    monkeypatch.setattr(src, "logprobs", lambda *a, **k: pytest.fail("recomputed"))
    again = reference_logprobs(src, tiny.tokenizer, text, p, key="tiny/seed0 torch")
    assert again.path == ref.path and np.array_equal(again.steps, ref.steps)
    assert kl_divergence(TorchLogits(tiny.model), again).kl_max == 0
    # another protocol is another store
    monkeypatch.undo()
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    p2 = TokenProtocol(window=64, scored="all", limit_tokens=256)
    other = reference_logprobs(src, tiny.tokenizer, text, p2, key="tiny/seed0 torch")
    assert other.path != ref.path and len(list((tmp_path / "kld-base").iterdir())) == 2
    loaded = ReferenceLogprobs.load(other.path)
    assert loaded.protocol == other.protocol and loaded.window_tokens == other.window_tokens


def test_result_dict_has_llamacpps_figures_and_reads_back(tiny, text):
    other = tiny_model("llama", seed=1).model
    p = TokenProtocol(window=64, scored="second-half", limit_tokens=256, dataset="wikitext2")
    r = kl_divergence(
        TorchLogits(other), reference_logprobs(TorchLogits(tiny.model), tiny.tokenizer, text, p)
    )
    d = r.to_dict()
    for k in (
        "kl_mean", "kl_lo", "kl_hi", "kl_median", "kl_p99", "kl_max", "top1_agreement",
        "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "tokens_scored", "protocol",
    ):  # fmt: skip
        assert k in d and d[k] is not None, k
    assert d["kl_lo"] < d["kl_mean"] < d["kl_hi"] and d["ppl_ratio_lo"] < d["ppl_ratio_hi"]
    assert d["protocol"]["scored"] == "second-half" and d["protocol"]["runtime"] == "torch"
    assert "uint16" in d["protocol"]["reference_store"]
    back = DeviationResult.from_dict(json.loads(json.dumps(d)))
    assert back == r


def test_vocabulary_mismatch_is_a_config_error(tiny, text):
    wide = tiny_model("llama", seed=0, vocab_size=416).model
    p = TokenProtocol(window=32, scored="all", limit_tokens=64)
    ref = reference_logprobs(TorchLogits(tiny.model), tiny.tokenizer, text, p)
    with pytest.raises(ConfigError, match="vocabulary"):
        kl_divergence(TorchLogits(wide), ref)


def test_deviation_task_options(tiny, text):
    other = tiny_model("llama", seed=1).model
    opts = {"window": 64, "limit_tokens": 256, "sqnr": "none", "reference": tiny.model}
    r = tasks.run_task("deviation", other, tiny.tokenizer, tiny.info, scored="second-half", **opts)
    assert r.protocol.scored == "second-half" and r.tokens_scored == 4 * 31 and r.windows == 4
    # the torch path (exact, side by side) and the stored path agree within the storage error
    p = TokenProtocol(window=64, scored="second-half", limit_tokens=256)
    stored = kl_divergence(
        TorchLogits(other), reference_logprobs(TorchLogits(tiny.model), tiny.tokenizer, text, p)
    )
    assert stored.kl_mean == pytest.approx(r.kl_mean, rel=1e-3)
    assert stored.top1_agreement == r.top1_agreement
    assert stored.perplexity_ratio == pytest.approx(r.perplexity_ratio, rel=1e-9)
    with pytest.raises(ConfigError, match="unknown logit runtime 'vllm': valid logit runtimes"):
        tasks.run_task("deviation", "m.gguf", tiny.tokenizer, None, runtime="vllm", **opts)
    with pytest.raises(ConfigError, match="unknown logit runtime"):
        logit_source("nope", tiny.model, n_ctx=8)


def test_module_docstring_example_runs(tmp_path, monkeypatch):
    import doctest

    from joules.evaluate import kld

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    result = doctest.testmod(kld, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
