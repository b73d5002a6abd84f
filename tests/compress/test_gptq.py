"""GPTQ: lower layer error than RTN on inputs with outlier channels, for every format family."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.compress import calibration_tokens, compress
from joules.compress.solvers.hessian import Hessian, gptq_quantize
from joules.models import tiny_model


def _inputs(seed: int, tokens: int = 1024, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    hot = torch.randperm(cols, generator=g)[:4]
    x[:, hot] *= 20.0  # a few high-norm channels, as in LLM activations
    return x


def _layer_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ q.T))


def _families() -> list[str]:
    specs = ["int4-g32", "int4-ch", "uint4-asym-g32", "int3-g64", "int8-ch"]
    for extra in ("mxfp4", "nf4", "fp8-e4m3", "nxfp4", "ternary-g64", "codebook3", "mxfp6-e2m3"):
        try:
            fmt = formats.get(extra)
            fmt.fit(torch.randn(4, 64))
            specs.append(extra)
        except Exception:  # family without fit() yet
            continue
    return specs


@pytest.mark.parametrize("spec", _families())
@pytest.mark.parametrize("seed", range(5))
def test_gptq_error_at_most_rtn(spec, seed):
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(64, 128, generator=g)
    x = _inputs(seed)
    h = Hessian(128)
    h.add(x)
    fmt = formats.get(spec)
    fitted = fmt.fit(w)
    q = gptq_quantize(w, h.matrix(), fitted.fake_quant_cols, block_size=32)
    rtn = fmt.fake_quant(w)
    assert _layer_error(w, q, x) <= _layer_error(w, rtn, x)
    # GPTQ's output lies on the format's grid: packing it with the fitted parameters is exact.
    assert torch.equal(fmt.dequantize(fitted.quantize(q)), q)


def test_act_order_false_and_mask():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = _inputs(0, cols=64)
    h = Hessian(64)
    h.add(x)
    fitted = formats.get("int4-g32").fit(w)
    mask = torch.rand(16, 64, generator=g) > 0.5
    q = gptq_quantize(w, h.matrix(), fitted.fake_quant_cols, act_order=False, mask=mask)
    assert torch.all(q[~mask] == 0)


def test_gptq_sequential_on_tiny_model_beats_rtn():
    model, tok, _ = tiny_model("llama", seed=0)
    ref, _, _ = tiny_model("llama", seed=0)
    rtn_model, _, _ = tiny_model("llama", seed=0)
    calib, _info = calibration_tokens(tok, n=8, length=64)
    compress(model, "gptq(format=int3-g32)", calibration=calib)
    compress(rtn_model, "rtn(format=int3-g32)")
    ids, _ = calibration_tokens(tok, n=4, length=64, seed=9)
    with torch.no_grad():
        r = ref(ids).logits
        e_gptq = float((model(ids).logits - r).pow(2).mean())
        e_rtn = float((rtn_model(ids).logits - r).pow(2).mean())
    assert e_gptq < e_rtn


def test_gptq_on_lm_head():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, "gptq(format=int8-ch, targets=[lm_head])", calibration=calib)
    assert list(cm.manifest.layers) == ["lm_head"]


def test_overrides_give_per_module_formats_in_one_pass():
    from joules.compress import calibration_tokens, compress, parse_recipe
    from joules.errors import ConfigError
    from joules.models import tiny_model

    m, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    r = 'gptq(format=gguf-q4_0, overrides=["*.mlp.down_proj=gguf-q8_0", "*.layers.0.*=gguf-q5_0"])'
    assert parse_recipe(parse_recipe(r).to_string()) == parse_recipe(r)
    layers = compress(m, r, calibration=calib).manifest.layers
    got = {n: v["format"] for n, v in layers.items()}
    assert got["model.layers.0.mlp.down_proj"] == "gguf-q8_0"  # first match wins
    assert got["model.layers.0.self_attn.q_proj"] == "gguf-q5_0"
    assert got["model.layers.1.self_attn.q_proj"] == "gguf-q4_0"
    with pytest.raises(ConfigError, match="GLOB=FORMAT"):
        parse_recipe('gptq(format=gguf-q4_0, overrides=["gguf-q8_0"])').steps[0].validate()


def test_inverse_cholesky_is_the_factor_of_the_damped_inverse():
    from joules.compress.solvers.hessian import inverse_cholesky

    x = _inputs(0, tokens=512, cols=96)
    h = (x.T @ x / len(x)).float()
    u = inverse_cholesky(h, 0.01)
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(96, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    assert torch.equal(u, u.triu()) and bool((torch.diag(u) > 0).all())
    assert float((u.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_layers_fed_one_input_share_one_hessian_and_factor():
    from joules.compress.context import CompressContext
    from joules.compress.steps.gptq import hessians

    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    ctx = CompressContext(model, tok, calib)
    block = ctx.layers[0]
    mods = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = ctx._first_block_inputs("test")
    hs = hessians(inputs, block, mods)
    attn = "self_attn."
    assert hs[attn + "q_proj"] is hs[attn + "k_proj"] is hs[attn + "v_proj"]
    assert hs["mlp.gate_proj"] is hs["mlp.up_proj"] and hs["mlp.up_proj"] is not hs["mlp.down_proj"]
    assert hs[attn + "q_proj"].factor(0.01, True) is hs[attn + "k_proj"].factor(0.01, True)
    # the shared sums equal each module's own accumulation
    own = Hessian(64)
    for batch in inputs.batches(block, {"q": mods[attn + "q_proj"]}):
        own.add(batch["q"])
    assert torch.allclose(own.matrix(), hs[attn + "q_proj"].matrix())


@pytest.mark.parametrize("spec", ["gguf-q4_0", "gguf-q5_0", "gguf-iq4_nl", "gguf-iq4_xs"])
def test_imatrix_weighted_scales_lower_gptq_layer_error(spec):
    """GPTQ on block scales searched with the Hessian's diagonal (llama.cpp's importance matrix)
    beats GPTQ on the unweighted scales, over seeds of inputs with hot channels."""
    fmt = formats.get(spec)
    ratios = []
    for seed in range(4):
        x = _inputs(seed, cols=256)
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(100 + seed))
        h = Hessian(256)
        h.add(x)
        errs = []
        for fitted in (fmt.fit(w), fmt.fit(w, imatrix=h.mean_square())):
            q = gptq_quantize(w, h.factor(0.01, True), fitted.fake_quant_cols, act_order=True)
            errs.append(_layer_error(w, q, x))
        ratios.append(errs[1] / errs[0])
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.97, ratios


def test_hessian_mean_square_is_llamacpp_imatrix():
    x = _inputs(1, tokens=300, cols=32)
    h = Hessian(32)
    h.add(x[:100])
    h.add(x[100:])
    assert torch.allclose(h.mean_square(), (x.double() ** 2).mean(0).float(), rtol=1e-5)
    assert torch.allclose(h.mean_square(), h.matrix().diagonal() / 2, rtol=1e-5)


def test_gptq_records_imatrix_weighted_scales_only_where_the_format_takes_them():
    m, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    r = 'gptq(format=gguf-iq4_nl, overrides=["*.mlp.down_proj=gguf-q8_0"])'
    layers = compress(m, r, calibration=calib).manifest.layers
    assert layers["model.layers.0.self_attn.q_proj"].get("scales") == "imatrix-weighted"
    assert "scales" not in layers["model.layers.0.mlp.down_proj"]
    m, tok, _ = tiny_model("llama", seed=0)
    layers = compress(m, "gptq(format=gguf-iq4_nl, imatrix=false)", calibration=calib).manifest
    assert all("scales" not in v for v in layers.layers.values())


def test_a_released_hessian_keeps_its_factor_and_diagonal_only():
    """``factor(release=True)`` frees the fp64 sum (GPTQ's wide layers) and keeps what the
    layers sharing the Hessian still read: the cached factor and the diagonal."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=g)
    kept, freed = Hessian(48), Hessian(48)
    kept.add(x)
    freed.add(x)
    f = freed.factor(0.01, True, release=True)
    assert freed.sum is None
    assert torch.equal(f.hinv, kept.factor(0.01, True).hinv)
    assert freed.factor(0.01, True) is f  # cached, no sum needed
    assert torch.equal(freed.mean_square(), kept.mean_square())
    with pytest.raises(ValueError, match="released"):
        freed.matrix()
    with pytest.raises(ValueError, match="released"):
        freed.add(x)
