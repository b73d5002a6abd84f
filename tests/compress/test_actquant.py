"""act_quant: per-token fake quant, Atom outlier channels (reordering exact), save/load, errors."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.compress import (
    calibration_tokens,
    compress,
    compressed_linears,
    load_compressed,
    parse_recipe,
)
from joules.compress.steps import actquant as aqmod
from joules.compress.steps.actquant import ActQuant, ActQuantLinear
from joules.errors import ConfigError
from joules.models import tiny_model


def _x(seed=0, t=40, d=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, 5] *= 30
    return x


@pytest.mark.parametrize(
    ("spec", "plain"), [("int8", "int8-ch-s32"), ("int4-g16", "int4-g16"), ("int8-ch", "int8-ch")]
)
def test_no_outliers_equals_plain_per_token_fake_quant(spec, plain):
    x = _x()
    aq = ActQuant(spec, "per-token", 64, 0)
    assert torch.equal(aq(x), formats.get(plain).fake_quant(x))
    assert torch.equal(aq(x.reshape(4, 10, 64)), aq(x).reshape(4, 10, 64))


def test_per_tensor_static_uses_calibration_range():
    aq = ActQuant("int8", "per-tensor", 64, 0)
    aq.set_range(-2.0, 2.0)
    y = aq(_x())
    assert float(y.abs().max()) <= 2.0 + 1e-6  # clipped to the calibration range
    assert len(torch.unique(y)) <= 255


def _tiny():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, info = calibration_tokens(tok, n=4, length=32)
    ids, _ = calibration_tokens(tok, n=2, length=32, seed=5)
    return model, tok, calib, info, ids


def test_reordering_leaves_fp_outputs_unchanged(monkeypatch):
    model, _, calib, _, ids = _tiny()
    with torch.no_grad():
        ref = model(ids).logits
    compress(model, "act_quant(format=int4-g16, outlier_channels=16)", calibration=calib)
    lins = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    assert len(lins) == 14
    perms = [m.act_quant.perm for m in lins.values()]
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)
    # With rounding switched off, the permuted weights and inputs give the fp outputs back.
    monkeypatch.setattr(aqmod, "_per_token", lambda _fmt, x: x)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)


def test_outlier_channels_are_8bit_and_counted():
    model, _, calib, _, _ = _tiny()
    cm = compress(
        model,
        "act_quant(format=int4-g16, outlier_channels=16) | rtn(format=int4-g16)",
        calibration=calib,
    )
    fmt = formats.get("int4-g16")
    for name, lin in compressed_linears(model).items():
        assert lin.act_quant is not None and lin.sparse is not None
        k0 = lin.in_features - 16
        w = lin.dequantize_weight()
        hi = formats.get("int8-ch").fake_quant(w[:, k0:].contiguous())
        assert torch.equal(w[:, k0:], hi)  # the outlier columns are on an int8 grid
        entry = cm.manifest.layers[name]
        numel = lin.in_features * lin.out_features
        expect = fmt.bits_per_element(tuple(w.shape)) + 8 * lin.sparse.nbytes / numel
        assert entry["bits_per_weight"] == pytest.approx(expect)
        assert entry["act_emulated"] and entry["outlier_channels"] == 16
    assert cm.manifest.bits_per_weight > 4.25


def test_gptq_after_act_quant_beats_rtn_and_round_trips(tmp_path):
    model, tok, calib, info, ids = _tiny()
    ref, _, _ = tiny_model("llama", seed=0)
    rtn, _, _ = tiny_model("llama", seed=0)
    recipe = "act_quant(format=int4-g16, outlier_channels=16) | {}(format=int4-g16)"
    cm = compress(model, recipe.format("gptq"), calibration=calib, calibration_info=info)
    compress(rtn, recipe.format("rtn"), calibration=calib)
    with torch.no_grad():
        r = ref(ids).logits
        out = model(ids).logits
        e_gptq = float((out - r).pow(2).mean())
        e_rtn = float((rtn(ids).logits - r).pow(2).mean())
    assert e_gptq < e_rtn
    cm.save(tmp_path / "w4a4", tok)
    m2, _, man = load_compressed(tmp_path / "w4a4")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, out)
    assert man.layers["model.layers.0.mlp.down_proj"]["outlier_channels"] == 16


def test_act_only_model_saves_and_loads(tmp_path):
    model, tok, calib, info, ids = _tiny()
    cm = compress(
        model,
        "smoothquant | act_quant(format=int8, granularity=per-tensor)",
        calibration=calib,
        calibration_info=info,
    )
    with torch.no_grad():
        out = model(ids).logits
    cm.save(tmp_path / "a8", tok)
    m2, _, _ = load_compressed(tmp_path / "a8")
    assert isinstance(m2.model.layers[1].mlp.down_proj, ActQuantLinear)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, out)


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (
            "act_quant(format=int4-g64, outlier_channels=48)",
            r"multiple of int4-g64's group size 64",
        ),
        ("act_quant(format=int4-g64, granularity=per-tensor)", "per-tensor format"),
        ("act_quant(format=int4-g64, granularity=dynamic)", "per-token, per-tensor"),
        ("act_quant(format=int9)", "act_quant"),
    ],
)
def test_bad_parameters_are_one_line_errors(recipe, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(recipe)
    assert "\n" not in str(e.value)


def test_outlier_channels_after_weight_step_refused():
    model, _, calib, _, _ = _tiny()
    with pytest.raises(ConfigError, match="before the weight step"):
        compress(
            model,
            "rtn(format=int8-ch) | act_quant(format=int8, outlier_channels=16)",
            calibration=calib,
        )
