"""Speed of light of a decoder LM on this machine: what a phase cannot beat.

    >>> from joules.bench.roofline import ModelCost
    >>> cost = ModelCost(streamed_bytes=500e6, matmul_params=100e6, head_params=28e6,
    ...     layers=30, heads=9, kv_heads=3, head_dim=64, kv_element_bytes=4)
    >>> round(cost.decode_sol_tok_s(batch=1, context=160, read_bw_bytes_s=10e9), 2)
    19.71

- **Decode** is memory-bound: each step must read every weight once (``streamed_bytes``: all
  parameters and buffers except an untied input embedding, of which only B rows are read) plus
  the KV cache of every sequence, and yields B tokens. Speed of light = B × read bandwidth ÷
  (streamed bytes + KV bytes at the step's context), averaged over the steps.
- **Prefill** is compute-bound: 2 FLOPs per weight per prompt token in the decoder linears, the
  head once per sequence (only the last position's logits are computed), and causal attention
  (2 matmuls of 2·head_dim FLOPs per query-key pair, P²/2 pairs per head). Limit = peak matmul
  FLOP/s of the compute dtype ÷ those FLOPs.

For compressed weights ``streamed_bytes`` is their stored size: a kernel that reads packed int4
weights needs to move only those bytes. An emulated layer that the bench decoded once (see
``compress.modules.linear.prepack(decode_emulated=True)``) streams its dense copy instead, and
counts it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelCost:
    """The bytes and FLOPs a model's forward costs, counted from its modules."""

    streamed_bytes: float  # weights read once per decode step
    matmul_params: float  # weights of the decoder linears (run for every token)
    head_params: float  # lm_head weights (run once per sequence in prefill, per token in decode)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_element_bytes: int
    model_bytes: float = 0.0  # every parameter and buffer, each stored tensor once

    def kv_bytes(self, batch: int, context: int) -> float:
        """Bytes of K and V for ``batch`` sequences of ``context`` positions."""
        return (
            2.0
            * self.layers
            * self.kv_heads
            * self.head_dim
            * context
            * batch
            * (self.kv_element_bytes)
        )

    def decode_sol_tok_s(self, batch: int, context: float, read_bw_bytes_s: float) -> float:
        """Tokens/s if each decode step only moved its bytes at ``read_bw_bytes_s``."""
        step_bytes = self.streamed_bytes + self.kv_bytes(batch, round(context))
        return batch * read_bw_bytes_s / step_bytes

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        attn = 2 * 2 * self.layers * self.heads * self.head_dim * prompt_len * (prompt_len + 1) / 2
        return batch * (2 * self.matmul_params * prompt_len + 2 * self.head_params + attn)

    def prefill_sol_tok_s(self, batch: int, prompt_len: int, peak_flops: float) -> float:
        """Prompt tokens/s if prefill ran at ``peak_flops``."""
        return batch * prompt_len * peak_flops / self.prefill_flops(batch, prompt_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCost:
        return cls(**d)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_cost(model: Any, info: Any, kv_dtype: torch.dtype) -> ModelCost:
    """Count a transformers decoder LM's streamed bytes and matmul weights from its modules.

    Compressed linears are counted by their stored buffers (packed codes, scales), dense ones by
    their weight; an untied input embedding is left out of the streamed bytes.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.numel() == 0:
            continue
        seen.add(t.data_ptr())
        total += _tensor_bytes(t)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # _parameters, not .weight: a compressed head's .weight would dequantize a full copy.
    embed_w = getattr(embed, "_parameters", {}).get("weight")
    head_w = getattr(head, "_parameters", {}).get("weight")
    tied = embed_w is not None and head_w is not None and embed_w.data_ptr() == head_w.data_ptr()
    streamed = total - (_tensor_bytes(embed_w) if embed_w is not None and not tied else 0)
    for mod in model.modules():  # an emulated layer decoded once streams its dense copy instead
        dense = getattr(mod, "_w_cache", None)
        if isinstance(dense, torch.Tensor):
            own = [b for n, b in mod.named_buffers(recurse=False) if b.numel()]
            streamed += _tensor_bytes(dense) - sum(_tensor_bytes(b) for b in own)
    head_params = float(info.vocab_size * info.hidden_size)
    layers_params = 0.0
    for name, mod in model.named_modules():
        if mod is head or mod is embed or ".layers." not in f".{name}.":
            continue
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            layers_params += float(mod.in_features * mod.out_features)
    return ModelCost(
        streamed_bytes=float(streamed),
        matmul_params=layers_params,
        head_params=head_params,
        layers=info.layers,
        heads=info.heads,
        kv_heads=info.kv_heads,
        head_dim=info.head_dim,
        kv_element_bytes=torch.empty((), dtype=kv_dtype).element_size(),
        model_bytes=float(total),
    )
