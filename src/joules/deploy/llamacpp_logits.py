"""A GGUF file run by llama.cpp as a logit source: KL divergence through the runtime people ship.

    >>> from joules.deploy.llamacpp_logits import LlamaCppLogits, llamacpp_kl_divergence
    >>> from joules.evaluate.kld import TokenProtocol
    >>> p = TokenProtocol(window=512, scored="second-half", limit_tokens=4096)
    >>> r = llamacpp_kl_divergence("q4_0.gguf", "f32.gguf", tok, text, p)   # doctest: +SKIP
    >>> r.kl_mean, r.kl_lo, r.kl_hi, r.top1_agreement                       # doctest: +SKIP

:class:`LlamaCppLogits` implements :class:`joules.evaluate.kld.LogitSource` through
llama-cpp-python: one ``llama_decode`` of the whole row with every position's logits
requested, as ``llama-perplexity`` decodes a chunk (one batch of up to 512 tokens, all
logits), read from llama.cpp's output buffer a batch at a time and turned into log-probs
:data:`_ROWS` positions at a time (:meth:`LlamaCppLogits.logprob_chunks`: no ``[n_ctx, V]``
copy), in the buffers :func:`joules.deploy.llamacpp.load_llama` picks (plain CPU buffers on
AMX CPUs, where llama.cpp's repacked ones crash), with flash attention on as llama.cpp's own
tools run it on a CPU (``-fa auto``; llama-cpp-python's default is off). Importing this module registers it as the
``llamacpp`` logit runtime, so the ``deviation`` task runs with ``runtime="llamacpp"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from joules.deploy.llamacpp import decoded_logits, extra_buffers_safe, load_llama
from joules.errors import ConfigError
from joules.evaluate.kld import (
    LOGIT_SOURCES,
    LogitSource,
    Progress,
    ReferenceLogprobs,
    TokenProtocol,
    kl_divergence,
    reference_logprobs,
)
from joules.evaluate.results import DeviationResult

# Positions whose log-softmax is made at once: 128 x 128k float32 = 66 MB.
_ROWS = 128


def row_context(protocol: TokenProtocol) -> int:
    """The context a protocol's rows need: the window, one more where BOS is prepended
    (``scored="all"``); llama-perplexity's second-half chunks are exactly ``window`` long, so
    the context is the one ``llama-perplexity -c WINDOW`` makes."""
    return protocol.window + (0 if protocol.scored == "second-half" else 1)


class LlamaCppLogits:
    """The log-softmax of a GGUF file's logits under llama.cpp, at each position of a row."""

    runtime = "llamacpp"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int,
        threads: int | None = None,
        flash_attn: bool = True,
    ) -> None:
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.flash_attn = flash_attn
        # no logits_all: the logits are read batch by batch (decoded_logits), never kept whole
        self.llm = load_llama(self.path, n_ctx=n_ctx, threads=threads, flash_attn=flash_attn)
        self.threads = int(self.llm.n_threads)
        self.name = f"llamacpp:{self.path.name}"
        self.vocab_size = int(self.llm.n_vocab())

    def compute_path(self) -> str:
        buffers = "default-buffers" if extra_buffers_safe() else "cpu-buffers"
        fa = "flash attention" if self.flash_attn else "no flash attention"
        return f"llamacpp:{buffers}, {fa}, {self.threads} threads, n_ctx {self.n_ctx}"

    def activations(self) -> str:
        return "llama.cpp's CPU kernels for each tensor's GGUF type"

    def logprob_chunks(
        self, row: list[int], *, first: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Float32 log-softmax of positions ``first .. stop - 1``, at most :data:`_ROWS` rows a
        chunk, as llama.cpp's batches arrive (the whole row is decoded, as before)."""
        if len(row) > self.n_ctx:
            raise ConfigError(
                f"a row of {len(row)} tokens does not fit the context of {self.n_ctx}: "
                "load with a larger n_ctx"
            )
        stop = len(row) if stop is None else stop
        for start, logits in decoded_logits(self.llm, row):
            end = min(stop, start + len(logits))
            for r0 in range(max(first, start), end, _ROWS):
                r1 = min(end, r0 + _ROWS)
                x = np.array(logits[r0 - start : r1 - start], dtype=np.float32)  # a copy
                yield torch.log_softmax(torch.from_numpy(x), dim=-1)

    def logprobs(self, row: list[int], *, first: int = 0) -> torch.Tensor:
        return torch.cat(list(self.logprob_chunks(row, first=first)))


@LOGIT_SOURCES.register("llamacpp")
def _llamacpp_source(model: Any, *, n_ctx: int, threads: int | None = None) -> LogitSource:
    """A ``.gguf`` path (a loaded torch model cannot run in llama.cpp)."""
    if not isinstance(model, (str, os.PathLike)) or Path(model).suffix.lower() != ".gguf":
        raise ConfigError(
            f"the llamacpp runtime runs .gguf files, got {model!r}: export it first "
            "(joules export DIR --to gguf -o model.gguf)"
        )
    return LlamaCppLogits(model, n_ctx=n_ctx, threads=threads)


def llamacpp_kl_divergence(
    model_gguf: str | os.PathLike[str],
    reference: ReferenceLogprobs | str | os.PathLike[str],
    tokenizer: Any = None,
    text: str | Sequence[int] | None = None,
    protocol: TokenProtocol | None = None,
    *,
    key: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> DeviationResult:
    """KL divergence of ``model_gguf`` under llama.cpp from ``reference``: a stored
    :class:`ReferenceLogprobs` (its rows are fed), or a reference ``.gguf`` whose log-probs are
    computed here over ``protocol``'s tokens of ``text`` (stored under ``key`` when given)."""
    if isinstance(reference, ReferenceLogprobs):
        rows = reference.rows()
    else:
        if text is None or protocol is None or tokenizer is None:
            raise ConfigError(
                "a reference .gguf needs the tokenizer, the text and the protocol to compute "
                "its log-probs over"
            )
        src = LlamaCppLogits(reference, n_ctx=row_context(protocol), threads=threads)
        reference = reference_logprobs(src, tokenizer, text, protocol, key=key, progress=progress)
        del src  # one model in memory at a time
        rows = reference.rows()
    n_ctx = max(len(r.tokens) for r in rows)
    test = LlamaCppLogits(model_gguf, n_ctx=n_ctx, threads=threads)
    return kl_divergence(test, reference, progress)


__all__ = ["LlamaCppLogits", "llamacpp_kl_divergence", "row_context"]
