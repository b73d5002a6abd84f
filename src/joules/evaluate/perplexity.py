"""Perplexity of a causal LM over a token stream, with windows, stride and a stated protocol.

    >>> from joules.models import tiny_model
    >>> from joules.data import load_text
    >>> from joules.evaluate.perplexity import perplexity
    >>> model, tok, _ = tiny_model()
    >>> r = perplexity(model, tok, load_text("wikitext2", "test"), window=64, limit_tokens=256)
    >>> r.tokens_scored, r.protocol.window
    (252, 64)

Protocol (what every :class:`PerplexityResult` records):

* The text is tokenized once, without special tokens, into one stream (``limit_tokens`` keeps
  its first N tokens: deterministic, and only a prefix of the text is tokenized).
* Windows of ``window`` stream tokens start at 0, ``stride``, 2·``stride``... until the stream
  ends. Each window scores only the tokens no earlier window scored, so with ``stride <
  window`` every scored token after the first window has at least ``window - stride`` tokens of
  context (Hugging Face's sliding-window recipe); ``stride == window`` gives non-overlapping
  windows.
* BOS: with ``add_bos`` each window is fed as ``[BOS] + window tokens`` and its first token is
  scored too; without, the first token of the stream (and of each window when ``stride ==
  window``) is context only. The default follows the tokenizer: SmolLM2's GGUF tokenizer does
  not add BOS (``add_bos_token`` is false), so neither do we, as llama.cpp would not.
* Compute: every forward runs on one stated path (:func:`joules.evaluate.scoring.evaluation_path`:
  compressed linears decode their weight into the model's dtype and multiply densely, never on a
  speed probe's choice); the protocol records it (``activation_dtype``, ``compute_path``).
* Reported: mean NLL in nats per scored token, perplexity = exp(mean NLL), a 95 % interval from
  the standard error across windows, and bits per byte = total NLL / ln 2 / UTF-8 bytes of the
  scored tokens' text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from joules import dtypes
from joules.data import load_text
from joules.data.tokens import tokenize_stream
from joules.errors import ConfigError
from joules.evaluate.results import PerplexityProtocol, PerplexityResult, weighted_mean_stderr
from joules.evaluate.scoring import Scorer, bos_default, model_dtype

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


@dataclass(frozen=True)
class Window:
    """One window: stream tokens ``[begin, end)``, of which ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, window: int, stride: int, add_bos: bool) -> list[Window]:
    """The windows covering a stream of ``n_tokens`` (see the module docstring)."""
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be between 1 and the window ({window}), got {stride}")
    windows: list[Window] = []
    begin = prev_end = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin if add_bos else begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        begin += stride
    return windows


def _decoded_bytes(tokenizer: Any, ids: Sequence[int]) -> int:
    if not ids:
        return 0
    text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def _unscored(n_tokens: int, windows: list[Window]) -> list[int]:
    """Stream positions no window scores (windows are sorted and their scored spans disjoint)."""
    out, pos = [], 0
    for w in windows:
        out.extend(range(pos, w.score_from))
        pos = w.end
    out.extend(range(pos, n_tokens))
    return out


def default_batch_size(window: int) -> int:
    # About 2,048 positions per forward: enough rows to keep the matmuls efficient on a CPU,
    # small enough that activations stay in a few hundred MB.
    return max(1, 2048 // window)


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | Sequence[int],
    *,
    window: int = 1024,
    stride: int | None = None,
    limit_tokens: int | None = None,
    add_bos: bool | None = None,
    batch_size: int | None = None,
    dataset: str = "<text>",
    split: str | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, or token ids already made by ``tokenizer``).

    ``stride`` defaults to ``window`` (non-overlapping windows); ``add_bos`` defaults to the
    tokenizer's own choice; ``batch_size`` windows run per forward pass.
    """
    stride = window if stride is None else stride
    if add_bos is None:
        add_bos = bos_default(tokenizer)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos_id is None:
        raise ConfigError("add_bos is set but the tokenizer has no BOS token: pass add_bos=False")
    if isinstance(text, str):
        ids = tokenize_stream(tokenizer, text, limit_tokens)
    else:
        ids = list(text)[:limit_tokens] if limit_tokens else list(text)
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    windows = plan_windows(len(ids), window, stride, add_bos)
    batch_size = batch_size or default_batch_size(window)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    total = sum(w.scored for w in windows)
    scorer = Scorer(model)
    stream = torch.tensor(ids, dtype=torch.long)
    offset = 1 if add_bos else 0  # position of stream token `begin` inside the fed row

    sums: list[float] = []
    counts: list[int] = []
    t0 = time.perf_counter()
    if progress:
        progress(0, total)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = offset + max(w.end - w.begin for w in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
        score = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]
        for row, w in enumerate(batch):
            if add_bos:
                input_ids[row, 0] = bos_id
            input_ids[row, offset : offset + w.end - w.begin] = stream[w.begin : w.end]
            score[row, offset + w.score_from - w.begin : offset + w.end - w.begin] = True
        nll = scorer.token_nll(input_ids, score)  # [n] in row order
        pos = 0
        for w in batch:
            sums.append(float(nll[pos : pos + w.scored].sum()))
            counts.append(w.scored)
            pos += w.scored
        if progress:
            progress(sum(counts), total)
    duration_s = time.perf_counter() - t0

    text_bytes = _decoded_bytes(tokenizer, ids)
    unscored_bytes = sum(_decoded_bytes(tokenizer, [ids[i]]) for i in _unscored(len(ids), windows))
    mean, stderr = weighted_mean_stderr(sums, counts)
    protocol = PerplexityProtocol(
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model",
        dataset=dataset,
        split=split,
        tokenizer=type(tokenizer).__name__
        + (f" ({tokenizer.name_or_path})" if getattr(tokenizer, "name_or_path", "") else ""),
        window=window,
        stride=stride,
        add_bos=add_bos,
        limit_tokens=limit_tokens,
        stream_tokens=len(ids),
        text_bytes=text_bytes,
        dtype=dtypes.torch_name(model_dtype(model)),
        batch_size=batch_size,
        activation_dtype=scorer.activations(),
        compute_path=scorer.compute_path(),
    )
    return PerplexityResult(
        protocol=protocol,
        nll_mean=mean,
        nll_stderr=stderr,
        tokens_scored=sum(counts),
        windows=len(windows),
        scored_bytes=max(0, text_bytes - unscored_bytes),
        duration_s=duration_s,
        window_nll_sums=sums,
        window_tokens=counts,
    )


def wikitext2_perplexity(
    model: Any,
    tokenizer: Any,
    *,
    split: str = "test",
    window: int = 1024,
    stride: int | None = None,
    limit_tokens: int | None = None,
    **kwargs: Any,
) -> PerplexityResult:
    """:func:`perplexity` on the shipped WikiText-2 split (``test`` to evaluate)."""
    return perplexity(
        model,
        tokenizer,
        load_text("wikitext2", split),
        window=window,
        stride=stride,
        limit_tokens=limit_tokens,
        dataset="wikitext2",
        split=split,
        **kwargs,
    )
