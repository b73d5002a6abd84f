"""Speed-of-light arithmetic and the byte/FLOP count of a model."""

from __future__ import annotations

import pytest
import torch

from joules.bench.roofline import ModelCost, model_cost
from joules.models import tiny_model


def test_model_cost_counts_streamed_bytes(tiny):
    model, _, info = tiny
    cost = model_cost(model, info, torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel() * 4  # untied: only B rows are read
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert cost.streamed_bytes == total - embed + buffers
    # 2 layers of q, o (64×64), k, v (2 KV heads of 16: 64×32), gate, up, down (64×128)
    assert cost.matmul_params == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128)
    assert cost.head_params == 384 * 64


def test_tied_head_is_streamed():
    model, _, info = tiny_model("llama", seed=0, tie_word_embeddings=True)
    cost = model_cost(model, info, torch.float32)
    assert cost.streamed_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_emulated_layers_decoded_once_stream_their_dense_copy():
    from joules.compress import compress, compressed_linears
    from joules.compress.modules.linear import prepack

    model, _, info = tiny_model("llama", seed=0)
    compress(model, "rtn(format=nf4)")
    packed = model_cost(model, info, torch.float32)
    prepack(model, decode_emulated=True)
    decoded = model_cost(model, info, torch.float32)
    lins = compressed_linears(model).values()
    dense = sum(m.in_features * m.out_features * 4 for m in lins)
    own = sum(b.numel() * b.element_size() for m in lins for b in m.buffers(recurse=False))
    assert decoded.streamed_bytes == packed.streamed_bytes - own + dense
    assert decoded.model_bytes == packed.model_bytes  # what is stored does not change


def test_speed_of_light_formulas():
    c = ModelCost(1e9, 1e8, 1e7, layers=2, heads=4, kv_heads=2, head_dim=8, kv_element_bytes=2)
    assert c.kv_bytes(3, 10) == 2 * 2 * 2 * 8 * 10 * 3 * 2
    assert c.decode_sol_tok_s(2, 10, 1e10) == pytest.approx(2 * 1e10 / (1e9 + c.kv_bytes(2, 10)))
    flops = 3 * (2 * 1e8 * 5 + 2 * 1e7 + 4 * 2 * 4 * 8 * 5 * 6 / 2)
    assert c.prefill_flops(3, 5) == pytest.approx(flops)
    assert c.prefill_sol_tok_s(3, 5, 1e12) == pytest.approx(15 * 1e12 / flops)
    assert ModelCost.from_dict(c.to_dict()) == c
