"""Tokenization shared by calibration (compress) and evaluation: one home below both.

    >>> from joules.models import tiny_model
    >>> from joules.data import load_text
    >>> from joules.data.tokens import tokenize_stream
    >>> _, tok, _ = tiny_model("llama", seed=0)
    >>> len(tokenize_stream(tok, load_text("wikitext2", "test"), limit_tokens=100))
    100

compress draws its calibration windows from the same token stream evaluation scores, so both
must tokenize a text the same way; living in ``data`` (below compress and evaluate) lets compress
use it without importing evaluate.
"""

from __future__ import annotations

from typing import Any

from joules.errors import ConfigError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS is the caller's explicit choice)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def tokenize_stream(tokenizer: Any, text: str, limit_tokens: int | None = None) -> list[int]:
    """Token ids of ``text``; with ``limit_tokens`` the first N, tokenizing only a prefix.

    The prefix is cut at a newline and must yield 256 tokens more than asked, so the kept
    tokens are the ones the whole text would give (BPE merges never reach that far).
    """
    if limit_tokens is not None and limit_tokens < 1:
        raise ConfigError(f"limit_tokens must be a positive number of tokens, got {limit_tokens}")
    if limit_tokens is None:
        return encode(tokenizer, text)
    chars = 8 * (limit_tokens + 256)
    while True:
        if chars >= len(text):
            return encode(tokenizer, text)[:limit_tokens]
        cut = text.rfind("\n", 0, chars)
        ids = encode(tokenizer, text[: cut if cut > 0 else chars])
        if len(ids) >= limit_tokens + 256:
            return ids[:limit_tokens]
        chars *= 2
