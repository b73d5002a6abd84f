"""Log-probabilities of chosen tokens under a causal LM: the one primitive every evaluation uses.

    >>> import torch
    >>> from joules.models import tiny_model
    >>> from joules.evaluate.scoring import Scorer
    >>> model, tok, _ = tiny_model()
    >>> ids = torch.tensor([[5, 6, 7, 8]])
    >>> mask = torch.tensor([[False, True, True, True]])   # score tokens 1..3 given their prefix
    >>> Scorer(model).token_nll(ids, mask).shape
    torch.Size([3])

Why not ``model(ids).logits``: the vocabulary projection of SmolLM2 (576 x 49,152) is about a
fifth of the model's multiply-adds, and a full ``[B, T, V]`` float32 logits tensor for 4 windows
of 1024 tokens is 800 MB. The scorer runs the decoder, keeps the hidden states of the positions
whose next token is scored, and projects those in chunks; log-softmax is always taken in float32
whatever the model's dtype. Models without a separable decoder / output head (or with logit
soft-capping) fall back to the full forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

_CHUNK_ROWS = 512  # positions projected to the vocabulary at once: 512 x 49,152 fp32 = 100 MB


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: all logical cores, as llama.cpp does)."""
    n = threads or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def bos_default(tokenizer: Any) -> bool:
    """Whether the tokenizer adds BOS by itself (Llama-2 style: yes; SmolLM2's GGUF: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS is the caller's explicit choice)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


class Scorer:
    """Wraps a causal LM to return hidden states, logits and token NLLs for chosen positions."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model_device(model)
        decoder = getattr(model, "get_decoder", lambda: None)()
        head = getattr(model, "get_output_embeddings", lambda: None)()
        cfg = getattr(model, "config", None)
        softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        self._split = decoder is not None and head is not None and not softcap
        self.decoder, self.head = decoder, head

    # -- hidden states and logits -------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Final hidden states ``[B, T, D]`` (or logits ``[B, T, V]`` on the fallback path)."""
        if self._split:
            out = self.decoder(input_ids=input_ids, **kwargs)
            return out.last_hidden_state, getattr(out, "past_key_values", None)
        out = self.model(input_ids=input_ids, **kwargs)
        return out.logits, getattr(out, "past_key_values", None)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, V]`` of hidden rows ``[N, D]`` (identity on the fallback path)."""
        if self._split:
            return self.head(rows).float()
        return rows.float()

    def logprob_chunks(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """Float32 log-softmax ``[n, V]`` of ``rows`` ``[N, D]``, chunk by chunk."""
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            yield torch.log_softmax(self.logits(rows[start : start + _CHUNK_ROWS]), dim=-1)

    # -- token scores -------------------------------------------------------------------------
    def rows_nll(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (nats, float64) of ``targets`` ``[N]`` given hidden rows ``[N, D]``."""
        out = []
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            logits = self.logits(rows[start : start + _CHUNK_ROWS])
            tgt = targets[start : start + _CHUNK_ROWS]
            # logsumexp - logit: the same as -log_softmax[target] without a [n, V] copy.
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, tgt[:, None])[:, 0]
            out.append(nll.double())
        if not out:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(out)

    @torch.inference_mode()
    def token_nll(self, input_ids: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """NLL of each token ``input_ids[b, t]`` with ``score[b, t]`` true, given ``input_ids[b, :t]``.

        input_ids, score: ``[B, T]``; ``score[:, 0]`` must be false (nothing predicts it).
        Returns ``[n_scored]`` float64 in row-major order. Right padding is harmless: a causal
        model's earlier positions never see later ones.
        """
        if score[:, 0].any():
            raise ValueError("score[:, 0] must be False: the first position has no prefix")
        input_ids = input_ids.to(self.device)
        score = score.to(self.device)
        hidden, _ = self.hidden(input_ids, use_cache=False)
        pred = score[:, 1:]  # [B, T-1]: position t-1 predicts token t
        rows = hidden[:, :-1][pred]  # [n, D]
        targets = input_ids[:, 1:][pred]  # [n]
        return self.rows_nll(rows, targets)
