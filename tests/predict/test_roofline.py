import math

import pytest

from joules.predict.predictor import predict
from joules.predict.roofline import Coefficients, Forward, Workload, forward_ops
from joules.predict.weights import weight_plan

from .conftest import synthetic_hw


def test_flops_and_bytes_of_a_tiny_config_equal_a_hand_count(tiny_shape):
    # Prefill of 3 tokens, batch 1, fp32 everywhere (a = k = 4 bytes); d=8, q=8, kv=4, h=2,
    # dh=4, f=16 (3 matrices), V=32. Causal pairs: 1 + 2 + 3 = 6; keys read: 3.
    plan = weight_plan(tiny_shape, "fp32", "fp32")
    ops = {o.name: o for o in forward_ops(tiny_shape, plan, Forward(1, 3, 3), "fp32", 4.0)}
    hand = {
        # name: (FLOPs, bytes)
        "embedding": (0, 3 * 8 * (4 + 4)),  # gather 3 rows, write them
        "attn_norm": (4 * 3 * 8, 2 * 3 * 8 * 4 + 8 * 4),
        # 2 N d (q + 2 kv); weights 16x8 fp32 + x in + q out + K,V written
        "qkv_proj": (2 * 3 * 8 * 16, 16 * 8 * 4 + 3 * 8 * 4 + 3 * 8 * 4 + 2 * 3 * 4 * 4),
        "attn_scores": (2 * 2 * 4 * 6, 3 * 8 * 4 + 3 * 4 * 4),
        "softmax": (5 * 2 * 6, 0),
        "attn_values": (2 * 2 * 4 * 6, 3 * 4 * 4 + 3 * 8 * 4),
        "o_proj": (2 * 3 * 8 * 8, 8 * 8 * 4 + 3 * 8 * 4 + 3 * 8 * 4),
        "mlp_norm": (4 * 3 * 8, 2 * 3 * 8 * 4 + 8 * 4),
        "mlp": (2 * 3 * 8 * 16 * 3, 3 * 16 * 8 * 4 + 2 * 3 * 8 * 4 + 2 * 3 * 16 * 4),
        "final_norm": (4 * 3 * 8, 2 * 3 * 8 * 4 + 8 * 4),
        "lm_head": (2 * 8 * 32, 32 * 8 * 4 + 8 * 4 + 32 * 4),  # last position only
    }
    assert set(ops) == set(hand)
    for name, (flops, nbytes) in hand.items():
        assert ops[name].flops == flops, name
        assert ops[name].nbytes == nbytes, name


def test_decode_step_reads_the_kv_cache_and_one_token(tiny_shape):
    plan = weight_plan(tiny_shape, "fp32", "fp32")
    ops = {o.name: o for o in forward_ops(tiny_shape, plan, Forward(2, 1, 10), "fp32", 2.0)}
    # batch 2, one new token at context 10: 10 pairs per sequence, K of 10 positions read
    assert ops["attn_scores"].flops == 2 * 2 * 4 * 10 * 2
    assert ops["attn_scores"].nbytes == 2 * 8 * 4 + 2 * 10 * 4 * 2.0


def test_batch1_memory_bound_decode_rate_is_bandwidth_over_bytes_per_token(small_shape):
    bw = 50e9
    hw = synthetic_hw(flops=1e30, bw=bw)  # compute is free: every operator is memory-bound
    coef = Coefficients(max_power_w=None)
    p = predict(
        small_shape, hw, Workload(prompt_len=8, gen_len=2), weight_format="fp32", coefficients=coef
    )
    # one decode step at context 9: its bytes, summed independently from the op list
    plan = weight_plan(small_shape, "fp32", "fp32")
    step = forward_ops(small_shape, plan, Forward(1, 1, 9), "fp32", 4.0)
    bytes_per_token = sum(o.nbytes for o in step)
    assert p.decode_tok_s == pytest.approx(bw / bytes_per_token, rel=1e-9)
    # and the bytes are the weights plus a little: all linears and the head read once
    weights = plan.total_bytes - plan.embedding.nbytes  # untied: the head is stored apart
    assert weights < bytes_per_token < 1.01 * weights
    assert p.bound("decode") == "memory"


def test_dequantisation_adds_time_for_low_bit_weights_only(small_shape):
    hw = synthetic_hw()
    coef = Coefficients(dequant_s_per_element=1e-9)
    wl = Workload(prompt_len=4, gen_len=3)
    dense = predict(small_shape, hw, wl, weight_format="fp32", coefficients=coef)
    q = predict(small_shape, hw, wl, weight_format="int4-g32", coefficients=coef)
    assert all(o.dequant_s == 0 for o in dense.operators)
    linears = 4 * (256 * 256 * 2 + 2 * 256 * 64 + 3 * 256 * 768)
    dq = sum(o.dequant_s for o in q.operators if o.phase == "prefill")
    assert dq == pytest.approx(linears * 1e-9)


def test_sliding_window_caps_attention(small_shape):
    from dataclasses import replace

    win = replace(small_shape, sliding_window=16, sliding_layers=(0, 1, 2, 3))
    plan = weight_plan(win, "fp32", "fp32")
    a = {o.name: o for o in forward_ops(win, plan, Forward(1, 1, 1000), "fp32", 4.0)}
    b = {o.name: o for o in forward_ops(small_shape, plan, Forward(1, 1, 1000), "fp32", 4.0)}
    assert a["attn_scores"].flops * 1000 == b["attn_scores"].flops * 16
    assert math.isclose(a["softmax"].flops / b["softmax"].flops, 16 / 1000)
