"""AWQ: folding keeps the fp model's function; scales + clipping beat round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.compress.steps import awq
from joules.errors import ConfigError
from joules.models import tiny_model


def _tiny():
    model, _tok, _info = tiny_model("llama", seed=0)  # 4 query heads, 2 KV heads: GQA
    return model.eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(seed))


def _capture(block: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Inputs of every linear of ``block`` when ``model`` runs on ``ids`` ([tokens, k])."""
    got: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, a, n=n: got.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).float())
        )
        for n, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return got


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_folding_keeps_outputs() -> None:
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    gen = torch.Generator().manual_seed(1)
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        s = torch.exp(torch.randn(64, generator=gen))
        awq.fold_into_norm(block.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], s)
        expand = awq.gqa_expand(4, 2, 16)
        s_o = torch.exp(torch.randn(32, generator=gen))[expand]  # one scale per v row
        awq.fold_gqa(a.v_proj, a.o_proj, s_o, expand)
        awq.fold_into_norm(
            block.post_attention_layernorm,
            [m.gate_proj, m.up_proj],
            torch.exp(torch.randn(64, generator=gen)),
        )
        awq.fold_into_linear(m.up_proj, [m.down_proj], torch.exp(torch.randn(128, generator=gen)))
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) <= 1e-5
    # a fold that breaks the function is caught by the same measure
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.001)
        assert _rel(model(ids).logits, ref) > 1e-5


def test_gqa_scales_must_be_shared_within_a_kv_group() -> None:
    model = _tiny()
    a = model.model.layers[0].self_attn
    with pytest.raises(ConfigError, match="KV group"):
        awq.fold_gqa(a.v_proj, a.o_proj, torch.rand(64) + 0.5, awq.gqa_expand(4, 2, 16))


def test_gqa_expand_maps_query_heads_to_their_kv_rows() -> None:
    e = awq.gqa_expand(9, 3, 64)  # SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64
    assert e.shape == (576,) and int(e.max()) == 191
    assert int(e[3 * 64 + 5]) == 64 + 5  # head 3 is in KV group 1
    assert int(e[8 * 64]) == 2 * 64


@pytest.mark.parametrize("clip", [False, True])
def test_awq_block_on_a_tiny_model(clip: bool) -> None:
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    block = model.model.layers[0]
    inputs = _capture(block, model, ids)
    targets = set(inputs)
    fmt = formats.get("int4-g32")
    recs = awq.awq_block(block, inputs, fmt, targets=targets, grid=10, clip=clip, max_tokens=32)
    assert set(recs) == targets
    assert all(r["awq_scale_tokens"] == 32 for r in recs.values())  # subsampled from 48
    assert "KV-group" in recs["self_attn.o_proj"]["awq_prev"]
    assert all(r["awq_loss"] <= r["awq_rtn_loss"] for r in recs.values())
    assert ("awq_clip_tokens" in recs["mlp.down_proj"]) == clip
    assert "awq_clip_tokens" not in recs["self_attn.q_proj"]
    with torch.no_grad():
        out = model(ids).logits
    if clip:
        assert _rel(out, ref) > 1e-5  # clipping changes the fp weights on purpose
    else:
        assert _rel(out, ref) <= 1e-5  # scales alone: same function


def test_untargeted_pairs_are_skipped_and_said() -> None:
    model = _tiny()
    block = model.model.layers[0]
    inputs = _capture(block, model, _ids())
    before = block.input_layernorm.weight.clone()
    recs = awq.awq_block(
        block,
        inputs,
        formats.get("int4-g32"),
        targets={"self_attn.q_proj", "mlp.down_proj"},
        grid=4,
    )
    assert "skipped" in recs["self_attn.q_proj"]["awq_scale"]
    assert torch.equal(block.input_layernorm.weight, before)
    assert "awq_alpha" in recs["mlp.down_proj"]


@pytest.mark.parametrize("seed", range(5))
def test_awq_layer_error_below_rtn(seed: int) -> None:
    """On calibration inputs with a few high-norm channels, AWQ (scales, then clipping) leaves
    a smaller output error than round-to-nearest of the same format."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=gen)
    hot = torch.randperm(128, generator=gen)[:4]
    x[:, hot] *= 25
    w = torch.randn(96, 128, generator=gen) * 0.05
    fmt = formats.get("int4-g32")
    ref = x @ w.T
    rtn = float((x @ fmt.fake_quant(w).T - ref).pow(2).mean())
    res = awq.search_scales(x, [w], fmt, grid=20)
    ws, xs = w * res.scales, x / res.scales
    scaled_only = float((xs @ fmt.fake_quant(ws).T - ref).pow(2).mean())
    lin = torch.nn.Linear(128, 96, bias=False)
    lin.weight.data.copy_(ws)
    awq.apply_clip(lin, awq.search_clip(xs, ws, fmt))
    full = float((xs @ fmt.fake_quant(lin.weight.data).T - ref).pow(2).mean())
    assert res.alpha > 0
    assert scaled_only < 0.9 * rtn
    assert full <= scaled_only * (1 + 1e-6)


def test_bad_grid() -> None:
    with pytest.raises(ConfigError, match="grid"):
        awq.search_scales(torch.randn(4, 32), [torch.randn(4, 32)], formats.get("int4-g32"), grid=0)


# -- the recipe step ---------------------------------------------------------------------------


def _calib(tok):
    from joules.compress import calibration_tokens

    return calibration_tokens(tok, n=4, length=32)[0]


def test_awq_step_quantizes_and_records() -> None:
    from joules.compress import compress, compressed_linears

    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "awq(format=int4-g32, grid=5, max_tokens=64)", calibration=_calib(tok))
    assert len(compressed_linears(model)) == 14
    layers = cm.manifest.layers
    assert {e["method"] for e in layers.values()} == {"awq"}
    assert all(e["awq_scale_tokens"] == 64 for e in layers.values())  # 2 of 4 sequences, all
    assert "KV-group" in layers["model.layers.1.self_attn.o_proj"]["awq_prev"]
    assert cm.manifest.bits_per_weight == 4.5


def test_awq_then_gptq() -> None:
    from joules.compress import compress

    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(
        model, "awq(format=int4-g32, grid=4) | gptq(format=int4-g32)", calibration=_calib(tok)
    )
    entries = cm.manifest.layers.values()
    assert {e["method"] for e in entries} == {"gptq"}
    assert all("awq_alpha" in e for e in entries)


def test_awq_step_without_clipping_keeps_the_fp_function() -> None:
    """Followed by a quantizing step (here on lm_head only), awq leaves the block linears in fp:
    with clip=false only folded scales changed them, so the final hidden states are unchanged."""
    from joules.compress import compress

    model, tok, _ = tiny_model("llama", seed=0)
    ids = _ids()
    with torch.no_grad():
        ref = model.model(ids).last_hidden_state
    recipe = "awq(format=int4-g32, grid=6, clip=false) | rtn(format=int8-ch, targets=[lm_head])"
    cm = compress(model, recipe, calibration=_calib(tok))
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # left for later steps
    assert any(e.get("awq_alpha", 0) > 0 for e in cm.manifest.layers.values())  # scales moved
    with torch.no_grad():
        out = model.model(ids).last_hidden_state
    assert _rel(out, ref) <= 1e-5


def test_awq_rejects_lm_head() -> None:
    from joules.compress import compress

    model, tok, _ = tiny_model("llama", seed=0)
    with pytest.raises(ConfigError, match="inside decoder blocks"):
        compress(model, "awq(format=int4-g32, targets=[lm_head])", calibration=_calib(tok))


def test_search_format_stands_in_for_the_search_only():
    from joules.compress import calibration_tokens, compress
    from joules.models import tiny_model

    m, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=32)
    r = "awq(format=gguf-iq4_nl, search_format=gguf-q4_0, grid=4) | gptq(format=gguf-iq4_nl)"
    layers = compress(m, r, calibration=calib).manifest.layers
    one = layers["model.layers.0.self_attn.q_proj"]
    assert one["awq_format"] == "gguf-q4_0" and one["format"] == "gguf-iq4_nl"
