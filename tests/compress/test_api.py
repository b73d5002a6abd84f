"""compress(): targets, manifest bits, save/load bit-exact, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from joules import formats
from joules.compress import (
    CompressedLinear,
    calibration_tokens,
    compress,
    compressed_linears,
    load_compressed,
)
from joules.errors import ConfigError
from joules.models import load_model, tiny_model


@pytest.fixture
def tiny():
    return tiny_model("llama", seed=0)


def _ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def test_rtn_really_packs_and_counts_bits(tiny):
    model, _tok, info = tiny
    dense_bytes = info.bytes
    cm = compress(model, "rtn(format=int4-g32)")
    lins = compressed_linears(model)
    assert len(lins) == 2 * 7  # q k v o gate up down per block
    fmt = formats.get("int4-g32")
    for name, lin in lins.items():
        w = lin.dequantize_weight()
        assert lin.qtensor().nbytes == fmt.storage_nbytes(tuple(w.shape))
        assert cm.manifest.layers[name]["bits_per_weight"] == 4.5
    assert cm.manifest.bits_per_weight == 4.5
    assert cm.manifest.model_bytes < dense_bytes
    assert isinstance(model.lm_head, torch.nn.Linear)  # not targeted by default


def test_rtn_equals_format_fake_quant(tiny):
    model, _, _ = tiny
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    compress(model, "rtn(format=mxfp4)")
    got = model.model.layers[0].mlp.down_proj.dequantize_weight()
    assert torch.equal(got, formats.get("mxfp4").fake_quant(w))


def test_targets_patterns_and_lm_head(tiny):
    model, _, _ = tiny
    cm = compress(model, "rtn(format=int8-ch, targets=[lm_head, '*.mlp.down_proj'])")
    assert set(cm.manifest.layers) == {
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    assert isinstance(model.lm_head, CompressedLinear)


def test_pattern_matching_nothing_is_an_error(tiny):
    model, _, _ = tiny
    with pytest.raises(ConfigError, match=r"target pattern 'decoder\.\*' matches no module"):
        compress(model, "rtn(format=int8-ch, targets=['decoder.*'])")


def test_group_that_does_not_divide_row_is_padded_and_counted(tiny):
    # Rows of 64 with groups of 48: the format pads the last group and counts it in its bits.
    model, _, _ = tiny
    cm = compress(model, "rtn(format=int4-g48)")
    shape = (128, 64)
    assert cm.manifest.layers["model.layers.0.mlp.gate_proj"]["bits_per_weight"] == (
        formats.get("int4-g48").bits_per_element(shape)
    )
    assert cm.manifest.layers["model.layers.0.mlp.gate_proj"]["bits_per_weight"] > 4 + 16 / 48


def test_calibration_required_and_bounded(tiny):
    model, tok, _ = tiny
    with pytest.raises(ConfigError, match="needs calibration data"):
        compress(model, "gptq(format=int4-g32)")
    with pytest.raises(ConfigError, match="longer than the model's context"):
        calibration_tokens(tok, n=2, length=4096, max_length=2048)
    calib, _ = calibration_tokens(tok, n=2, length=64)
    model.config.max_position_embeddings = 32
    with pytest.raises(ConfigError, match="exceed the model's context"):
        compress(model, "gptq(format=int4-g32)", calibration=calib)


def test_calibration_is_valid_split_and_seeded(tiny):
    _, tok, _ = tiny
    a, da = calibration_tokens(tok, n=4, length=32, seed=3)
    b, db = calibration_tokens(tok, n=4, length=32, seed=3)
    _c, dc = calibration_tokens(tok, n=4, length=32, seed=4)
    assert torch.equal(a, b) and da["sha256"] == db["sha256"] != dc["sha256"]
    assert da["split"] == "valid" and a.shape == (4, 32)


@pytest.mark.parametrize(
    "recipe",
    [
        "rtn(format=int8-ch)",
        "gptq(format=int4-g32)",
        "rtn(format=mxfp4, targets=[lm_head, '*_proj'])",
    ],
)
def test_save_load_bit_identical(tiny, tmp_path, recipe):
    model, tok, _ = tiny
    calib, info = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, recipe, calibration=calib, calibration_info=info)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    cm.save(tmp_path / "out", tok)
    data = json.loads((tmp_path / "out" / "joules.json").read_text())
    assert data["recipe"] == cm.manifest.recipe and data["versions"]["torch"]
    assert not list((tmp_path / "out").glob("*.bin")), "no pickle files"
    m2, _, info2 = load_model(tmp_path / "out")
    with torch.no_grad():
        after = m2(ids).logits
    assert torch.equal(before, after)
    assert info2.compression["recipe"] == cm.manifest.recipe
    assert info2.bytes == cm.manifest.model_bytes


def test_tied_head_compressed_unties(tmp_path):
    model, tok, _ = tiny_model("llama", seed=1, tie_word_embeddings=True)
    cm = compress(model, "rtn(format=int8-ch, targets=[lm_head])")
    cm.save(tmp_path / "o", tok)
    m2, _, _ = load_compressed(tmp_path / "o")
    assert isinstance(m2.lm_head, CompressedLinear)
    assert torch.equal(m2.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_bf16_cast_keeps_packed_parts(tiny):
    model, _, _ = tiny
    compress(model, "rtn(format=int4-g32)")
    lin = model.model.layers[0].self_attn.q_proj
    scales = lin.qweight_scales.clone()
    model.to(torch.bfloat16)
    assert lin.qweight_scales.dtype == torch.float16 and torch.equal(lin.qweight_scales, scales)
    assert lin.dequantize_weight().dtype == torch.bfloat16


def test_recompressing_a_layer_is_an_error(tiny):
    model, _, _ = tiny
    with pytest.raises(ConfigError, match="already compressed"):
        compress(model, "rtn(format=int8-ch) | rtn(format=int4-g32)")


def test_manifest_steps_time_and_memory(tiny):
    model, _, _ = tiny
    cm = compress(model, "rtn(format=int8-ch)")
    (s,) = cm.manifest.steps
    assert s["name"] == "rtn" and s["time_s"] > 0 and s["peak_rss_bytes"] > 10 * 2**20
