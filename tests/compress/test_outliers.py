"""outliers: dense-and-sparse weights, bits counted, bit-exact save/load, weighted codebook."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.compress import calibration_tokens, compress, compressed_linears, load_compressed
from joules.compress.steps.outliers import SparseOutliers, SparsePlan, select_outliers
from joules.errors import ConfigError
from joules.models import tiny_model


def test_sparse_part_round_trips_and_counts_bytes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g)
    mask = select_outliers(w.abs(), 0.05)
    assert int(mask.sum()) == round(0.05 * w.numel())
    sp = SparseOutliers.from_mask(w, mask)
    out = sp.add_to(torch.zeros_like(w))
    assert torch.equal(out[mask], w[mask].half().float())
    assert torch.all(out[~mask] == 0)
    assert sp.nbytes == 4 * 13 + 2 * sp.nnz + 2 * sp.nnz  # int32 rows, int16 cols, fp16 values


def test_outlier_weights_leave_the_dense_ranges():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[3, 7] = 40.0  # one huge weight would wreck its group's scale
    mask = select_outliers(w.abs(), 0.01)
    assert mask[3, 7]
    f = SparsePlan(mask).fit(formats.get("int3-g32"), w)
    q = f.fake_quant(w)
    plain = formats.get("int3-g32").fake_quant(w)
    rest = ~mask
    assert float((q - w)[rest].pow(2).mean()) < float((plain - w)[rest].pow(2).mean())
    assert float(q[3, 7]) == 40.0


@pytest.mark.parametrize("step", ["rtn", "gptq"])
def test_outliers_bits_counted_and_save_load_bit_exact(tmp_path, step):
    model, tok, _ = tiny_model("llama", seed=0)
    calib, info = calibration_tokens(tok, n=4, length=32)
    cm = compress(
        model,
        f"outliers(fraction=0.01) | {step}(format=int3-g32)",
        calibration=calib,
        calibration_info=info,
    )
    fmt = formats.get("int3-g32")
    for name, lin in compressed_linears(model).items():
        numel = lin.in_features * lin.out_features
        assert lin.sparse.nnz == round(0.01 * numel)
        expect = fmt.bits_per_element((lin.out_features, lin.in_features))
        expect += 8 * lin.sparse.nbytes / numel
        assert cm.manifest.layers[name]["bits_per_weight"] == pytest.approx(expect)
    assert cm.manifest.bits_per_weight > fmt.bits_per_element((64, 64))
    ids, _ = calibration_tokens(tok, n=2, length=32, seed=4)
    with torch.no_grad():
        out = model(ids).logits
    cm.save(tmp_path / "ds", tok)
    m2, _, _ = load_compressed(tmp_path / "ds")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, out)
    a = compressed_linears(model)["model.layers.1.mlp.up_proj"].sparse
    b = compressed_linears(m2)["model.layers.1.mlp.up_proj"].sparse
    for buf in ("crow", "col", "values"):
        assert torch.equal(getattr(a, buf), getattr(b, buf))


@pytest.mark.parametrize("sens", ["hessian", "fisher"])
def test_sensitivity_weights_the_codebook(sens):
    model, tok, _ = tiny_model("llama", seed=0)
    plain, _, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(
        model,
        f"outliers(fraction=0, criterion=sensitivity, sensitivity={sens}) | rtn(format=codebook3)",
        calibration=calib,
    )
    compress(plain, "rtn(format=codebook3)")
    a = compressed_linears(model)["model.layers.0.self_attn.q_proj"]
    b = compressed_linears(plain)["model.layers.0.self_attn.q_proj"]
    assert a.sparse is None  # fraction 0: the weighted codebook alone
    assert not torch.equal(a.dequantize_weight(), b.dequantize_weight())
    assert (
        "sensitivity" in cm.manifest.layers["model.layers.0.self_attn.q_proj"]["outlier_criterion"]
    )


@pytest.mark.parametrize("frac", [1.0, 1.5, -0.1])
def test_bad_fraction_is_one_line_error(frac):
    from joules.compress import parse_recipe

    with pytest.raises(ConfigError, match=r"fraction.*\[0, 1\)") as e:
        parse_recipe(f"outliers(fraction={frac})")
    assert "\n" not in str(e.value)


def test_outliers_with_outlier_channels_refused():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    with pytest.raises(ConfigError, match="one of the two"):
        compress(
            model,
            "act_quant(format=int4-g16, outlier_channels=16) | outliers | rtn(format=int4-g16)",
            calibration=calib,
        )
