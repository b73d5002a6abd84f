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

One compute path per protocol: every forward of the scorer runs inside
:func:`evaluation_path`, where compressed linears decode their weight into the model's dtype and
multiply densely (``emulated``) instead of running a weight-only kernel in whatever activation
dtype a speed probe picked for this CPU. So a quality figure is the same on an idle and a loaded
machine, whatever the probe found or ``JOULES_KERNEL_DTYPE`` asks for speed work, and every
result records what ran (:func:`activations_of`, :func:`compute_path`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from joules import dtypes
from joules.compress.modules.linear import CompressedLinear, decoded
from joules.models.hf_cache import output_cache

_CHUNK_ROWS = 512  # positions projected to the vocabulary at once: 512 x 49,152 fp32 = 100 MB


def evaluation_path(model: Any) -> AbstractContextManager[None]:
    """The context every evaluation forward runs in: ``model``'s compressed linears decode
    their weight into the model's dtype and multiply densely (``path == "emulated"``), one
    layer's dense weight at a time, never on a kernel a speed probe (or ``JOULES_KERNEL_DTYPE``)
    picked for speed work."""
    return decoded(model, cache=False)


def activations_of(model: Any) -> str:
    """The dtype ``model``'s linears compute in under :func:`evaluation_path` (for a result's
    protocol): the model's own, since compressed weights are decoded into it."""
    return (
        f"{dtypes.short_name(model_dtype(model))} (the model's dtype; compressed weights decoded)"
    )


def compute_path(model: Any) -> str:
    """How ``model``'s linears ran in their last forward, e.g. ``"dense/fp32 x1,
    kernel:cpu-int4/fp32 x14"`` (compressed linears report their own path)."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            counts[m.path] += 1
        elif isinstance(m, torch.nn.Linear):
            counts[f"dense/{dtypes.short_name(m.weight.dtype)}"] += 1
    return ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())) or "no linear layers"


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
        with evaluation_path(self.model):
            if self._split:
                out = self.decoder(input_ids=input_ids, **kwargs)
                return out.last_hidden_state, output_cache(out)
            out = self.model(input_ids=input_ids, **kwargs)
        return out.logits, output_cache(out)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, V]`` of hidden rows ``[N, D]`` (identity on the fallback path)."""
        if self._split:
            with evaluation_path(self.model):
                return self.head(rows).float()
        return rows.float()

    def logprob_chunks(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """Float32 log-softmax ``[n, V]`` of ``rows`` ``[N, D]``, chunk by chunk."""
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            yield torch.log_softmax(self.logits(rows[start : start + _CHUNK_ROWS]), dim=-1)

    def compute_path(self) -> str:
        """How the model's linears ran in the scorer's last forward (see :func:`compute_path`)."""
        return compute_path(self.model)

    def activations(self) -> str:
        """The activation dtype of the model's compressed linears here, and why."""
        return activations_of(self.model)

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
