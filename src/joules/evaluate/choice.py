"""Multiple-choice accuracy (HellaSwag, or a user's JSONL of context / endings / label).

    >>> from joules.models import tiny_model
    >>> from joules.data import load_choice
    >>> from joules.evaluate import choice_accuracy
    >>> model, tok, _ = tiny_model()
    >>> r = choice_accuracy(model, tok, load_choice("hellaswag"), limit=4, seed=0)
    >>> r.n, 0.0 <= r.acc_norm <= 1.0
    (4, True)

Each ending is scored by the sum of its tokens' log-probabilities given the context, as
lm-evaluation-harness does for ``multiple_choice`` tasks: the continuation is ``" " + ending``
(the target delimiter), the context is tokenized alone and the continuation's tokens are those
the whole string adds after it. ``acc`` picks the highest sum, ``acc_norm`` the highest sum per
character of the ending and ``acc_bytes`` the highest sum per UTF-8 byte of it (lm-eval's three
metrics; the delimiter is not counted; 181 HellaSwag items have non-ASCII endings, where the two
normalisations can differ). Ties go to the first ending, as ``numpy.argmax``. A test feeds the
same items to lm-eval's own metric code and gets the same choice for every item.

The shipped HellaSwag is llama.cpp's text with lm-eval's ``preprocess`` applied to every string
(see :mod:`joules.data`): lm-eval's scoring, on text where ``ctx_b`` is not capitalised.

Speed: all endings of an item share the context, so by default the context is run once, its KV
cache is repeated for the endings, and the endings run as one batch on top of it
(``kv_reuse=True``): about 2.5x fewer positions than feeding 4 full sequences. The plain path
(``kv_reuse=False``) feeds ``context + ending`` for each ending in one right-padded batch; a test
checks both give the same scores.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from joules import dtypes
from joules.data import ChoiceItem
from joules.data.tokens import encode
from joules.errors import ConfigError
from joules.evaluate.results import ChoiceProtocol, ChoiceResult
from joules.evaluate.scoring import Scorer, bos_default, model_dtype
from joules.models.hf_cache import cache_kwarg

DEFAULT_SEED = 1234  # the fixed seed that picks the --limit items
HELLASWAG_TEXT = (
    "lm-eval scoring on llama.cpp's HellaSwag text with lm-eval's preprocess applied; "
    "ctx_b not capitalised (the file does not mark where ctx_a ends)"
)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as ``numpy.argmax``)."""
    return max(range(len(values)), key=values.__getitem__)


def choose(scores: Sequence[float], endings: Sequence[str]) -> tuple[int, int, int]:
    """lm-eval's picks ``(acc, acc_norm, acc_bytes)``: by sum, per character, per UTF-8 byte."""
    chars = [s / max(1, len(e)) for s, e in zip(scores, endings, strict=True)]
    nbytes = [s / max(1, len(e.encode("utf-8"))) for s, e in zip(scores, endings, strict=True)]
    return argmax(scores), argmax(chars), argmax(nbytes)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval does.

    Trailing spaces of the context move to the continuation; the continuation's tokens are the
    whole string's tokens after the context's own tokenization.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def select_items(n_items: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the items to evaluate: all, or ``limit`` drawn with a fixed seed (sorted)."""
    if limit is None or limit >= n_items:
        return list(range(n_items))
    if limit < 1:
        raise ConfigError(f"limit must be a positive number of items, got {limit}")
    return sorted(random.Random(seed).sample(range(n_items), limit))


class ChoiceScorer:
    """Scores the endings of one item: ``scores(item) -> [sum log p]`` per ending."""

    def __init__(self, model: Any, tokenizer: Any, add_bos: bool | None = None, kv_reuse=True):
        self.scorer = Scorer(model)
        self.tokenizer = tokenizer
        self.add_bos = bos_default(tokenizer) if add_bos is None else add_bos
        self.kv_reuse = kv_reuse and self.scorer._split
        prefix = tokenizer.bos_token_id if self.add_bos else None
        # An empty context still needs one position to predict from (lm-eval uses BOS/EOS).
        self._prefix = prefix
        self._fallback_prefix = tokenizer.bos_token_id or tokenizer.eos_token_id or 0
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def encode(self, item: ChoiceItem) -> tuple[list[int], list[list[int]]]:
        conts, ctx = [], None
        for ending in item.endings:
            c, cont = encode_pair(self.tokenizer, item.context, " " + ending)
            ctx = c if ctx is None else ctx
            if not cont:
                raise ConfigError(f"ending {ending!r} tokenizes to nothing after its context")
            conts.append(cont)
        ctx = list(ctx or [])
        if self._prefix is not None:
            ctx = [self._prefix, *ctx]
        if not ctx:
            ctx = [self._fallback_prefix]
        return ctx, conts

    @torch.inference_mode()
    def scores(self, item: ChoiceItem) -> list[float]:
        """Sum of log-probabilities of each ending's tokens given the context."""
        ctx, conts = self.encode(item)
        if self.kv_reuse:
            return self._scores_kv(ctx, conts)
        return self._scores_plain(ctx, conts)

    def _scores_plain(self, ctx: list[int], conts: list[list[int]]) -> list[float]:
        width = len(ctx) + max(len(c) for c in conts)
        ids = torch.full((len(conts), width), self.pad_id, dtype=torch.long)  # [E, T]
        score = torch.zeros((len(conts), width), dtype=torch.bool)
        for row, cont in enumerate(conts):
            ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            score[row, len(ctx) : len(ctx) + len(cont)] = True
        nll = self.scorer.token_nll(ids, score)
        out, pos = [], 0
        for cont in conts:
            out.append(-float(nll[pos : pos + len(cont)].sum()))
            pos += len(cont)
        return out

    def _scores_kv(self, ctx: list[int], conts: list[list[int]]) -> list[float]:
        s = self.scorer
        dev = s.device
        h_ctx, cache = s.hidden(torch.tensor([ctx], device=dev), use_cache=True)  # [1, C, D]
        last = h_ctx[0, -1:]  # [1, D]: predicts each ending's first token
        cache.batch_repeat_interleave(len(conts))
        width = max(len(c) for c in conts)
        ids = torch.full((len(conts), width), self.pad_id, dtype=torch.long)  # [E, L]
        for row, cont in enumerate(conts):
            ids[row, : len(cont)] = torch.tensor(cont)
        kw = {cache_kwarg(s.decoder if s.decoder is not None else s.model): cache}
        h_cont, _ = s.hidden(ids.to(dev), **kw, use_cache=True)  # [E, L, D]
        rows = [torch.cat([last, h_cont[e, : len(c) - 1]]) for e, c in enumerate(conts)]
        nll = s.rows_nll(torch.cat(rows), torch.tensor([t for c in conts for t in c], device=dev))
        out, pos = [], 0
        for cont in conts:
            out.append(-float(nll[pos : pos + len(cont)].sum()))
            pos += len(cont)
        return out


def choice_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[ChoiceItem],
    *,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    add_bos: bool | None = None,
    kv_reuse: bool = True,
    dataset: str = "hellaswag",
    model_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ChoiceResult:
    """``acc``, ``acc_norm`` and ``acc_bytes`` of ``model`` on ``items`` (``limit`` drawn by ``seed``).

    ``dataset="hellaswag"`` states the shipped text's protocol in the result; pass the file's
    name for other items.
    """
    if not items:
        raise ConfigError("no multiple-choice items to evaluate")
    chosen = select_items(len(items), limit, seed)
    scorer = ChoiceScorer(model, tokenizer, add_bos=add_bos, kv_reuse=kv_reuse)
    correct = correct_norm = correct_bytes = 0
    preds: list[int] = []
    preds_norm: list[int] = []
    preds_bytes: list[int] = []
    t0 = time.perf_counter()
    for done, i in enumerate(chosen):
        item = items[i]
        p, pn, pb = choose(scorer.scores(item), item.endings)
        preds.append(p)
        preds_norm.append(pn)
        preds_bytes.append(pb)
        correct += p == item.label
        correct_norm += pn == item.label
        correct_bytes += pb == item.label
        if progress:
            progress(done + 1, len(chosen))
    protocol = ChoiceProtocol(
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model",
        dataset=dataset,
        items_total=len(items),
        limit=limit,
        seed=seed,
        add_bos=scorer.add_bos,
        dtype=dtypes.torch_name(model_dtype(model)),
        kv_reuse=scorer.kv_reuse,
        text=HELLASWAG_TEXT if dataset == "hellaswag" else "the file's text, as given",
        activation_dtype=scorer.scorer.activations(),
        compute_path=scorer.scorer.compute_path(),
    )
    return ChoiceResult(
        protocol=protocol,
        n=len(chosen),
        correct=correct,
        correct_norm=correct_norm,
        correct_bytes=correct_bytes,
        duration_s=time.perf_counter() - t0,
        items=chosen,
        predictions=preds,
        predictions_norm=preds_norm,
        predictions_bytes=preds_bytes,
    )
