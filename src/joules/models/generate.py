"""Timed greedy generation: the smallest end-to-end use of a loaded model.

    >>> from joules.models import tiny_model
    >>> from joules.models.generate import generate_timed
    >>> model, tok, _ = tiny_model()
    >>> r = generate_timed(model, tok, "Hello", new_tokens=8)
    >>> r.new_tokens
    8

The bench issue grows this into prefill/decode latency and joules per token; here it is one
greedy ``generate`` call timed with ``perf_counter`` after a one-token warm-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationResult:
    """What one timed greedy generation produced and how long it took."""

    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.latency_s if self.latency_s > 0 else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "latency_s": self.latency_s,
            "tokens_per_s": self.tokens_per_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationResult:
        """Inverse of :meth:`to_dict` (``tokens_per_s`` is derived, so it is not read back)."""
        return cls(d["prompt"], d["text"], d["prompt_tokens"], d["new_tokens"], d["latency_s"])


@torch.inference_mode()
def generate_timed(
    model, tokenizer, prompt: str, new_tokens: int = 64, warmup: bool = True
) -> GenerationResult:
    """Greedily generate exactly ``new_tokens`` tokens after ``prompt`` and time it.

    ``warmup`` runs a one-token generation first (outside the timed span); pass False when the
    caller has warmed up already, e.g. to wrap exactly the timed call in an energy window.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = dict(
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        # EOS is ignored so that every run generates the same number of tokens.
        eos_token_id=None,
    )
    if warmup:
        model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    latency_s = time.perf_counter() - t0
    n_prompt = enc["input_ids"].shape[1]
    generated = out[0, n_prompt:]
    return GenerationResult(
        prompt=prompt,
        text=tokenizer.decode(generated, skip_special_tokens=True),
        prompt_tokens=n_prompt,
        new_tokens=int(generated.numel()),
        latency_s=latency_s,
    )
