"""Pruning: exact patterns and sparsity, SparseGPT <= Wanda <= magnitude, zeros survive."""

from __future__ import annotations

import pytest
import torch

from joules import formats
from joules.compress import calibration_tokens, compress, load_compressed
from joules.compress.modules.linear import CompressedLinear, PrunedLinear
from joules.compress.solvers.hessian import Hessian, PruneRule, obs_solve
from joules.compress.steps.prune import select_mask
from joules.errors import ConfigError
from joules.models import tiny_model


def _inputs(seed: int, tokens: int = 1024, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 20.0  # a few high-norm channels
    return x


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("seed", range(5))
def test_sparsegpt_le_wanda_le_magnitude(pattern, seed):
    n, m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    x = _inputs(seed)
    ref = x @ w.T

    def err(q):
        return float(torch.linalg.norm(x @ q.T - ref))

    mag = w * select_mask(w.abs(), 0.5, n, m, per_row=False)
    wanda = w * select_mask(w.abs() * x.norm(dim=0), 0.5, n, m, per_row=True)
    h = Hessian(128)
    h.add(x)
    sgpt, keep = obs_solve(
        w, h.matrix(), None, act_order=False, block_size=32, prune=PruneRule(0.5, n, m)
    )
    assert torch.all(sgpt[~keep] == 0)
    assert err(sgpt) <= err(wanda) <= err(mag)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_have_exact_pattern(pattern):
    n, m = map(int, pattern.split(":"))
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, f"prune(method=sparsegpt, pattern={pattern})", calibration=calib)
    for name, lin in model.named_modules():
        if isinstance(lin, PrunedLinear):
            keep = lin.weight_mask
            groups = keep.reshape(keep.shape[0], -1, m)
            assert torch.all(groups.sum(-1) == m - n), name  # n of every m along the inputs
            assert torch.all(lin.weight[~keep] == 0)
            assert cm.manifest.layers[name]["sparsity"] == pytest.approx(n / m)
            assert cm.manifest.layers[name]["nm_layout_fp16_bits_per_weight"] > 0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_exact_sparsity(method):
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, f"prune(method={method}, sparsity=0.25)", calibration=calib)
    sp = [e["sparsity"] for e in cm.manifest.layers.values()]
    assert len(sp) == 14 and all(abs(s - 0.25) < 1e-3 for s in sp)


@pytest.mark.parametrize("quant", ["gptq(format=int4-g32)", "rtn(format=uint4-asym-g32)"])
def test_zeros_stay_zero_through_quantization_and_save(tmp_path, quant):
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, f"prune(method=wanda, pattern=2:4) | {quant}", calibration=calib)
    ids = calib[:2, :16]
    with torch.no_grad():
        before = model(ids).logits
    for lin in model.modules():
        if isinstance(lin, CompressedLinear):
            w = lin.dequantize_weight()
            assert torch.all(w[~lin.weight_mask] == 0)
            # a kernel reads only the codes: allowed exactly when they decode pruned weights to 0
            assert lin.path.startswith("kernel:") == lin._mask_is_implied()
    cm.save(tmp_path / "o", tok)
    m2, _, _ = load_compressed(tmp_path / "o")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, before)
    layer = cm.manifest.layers["model.layers.0.mlp.down_proj"]
    fmt = formats.get(layer["format"])
    # codes + scales (+ minima) + the 1-bit keep-bitmap
    assert layer["bits_per_weight"] == fmt.bits_per_element(tuple(layer["shape"])) + 1.0


def test_pruned_only_model_saves_and_loads(tmp_path):
    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "prune(method=magnitude, sparsity=0.5)")
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    cm.save(tmp_path / "p", tok)
    m2, _, _ = load_compressed(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, before)
    assert isinstance(m2.model.layers[0].mlp.up_proj, PrunedLinear)


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ("prune(pattern=3:4:8)", "use 'unstructured' or n:m"),
        ("prune(pattern=4:2)", "0 < n < m"),
        ("prune(sparsity=1.0)", "use a value in (0, 1)"),
        ("prune(sparsity=0)", "use a value in (0, 1)"),
        ("prune(pattern=2:4, sparsity=0.7)", "fixes the sparsity at 0.5"),
        ("prune(method=obd)", "valid values are magnitude, wanda, sparsegpt"),
    ],
)
def test_bad_prune_parameters(recipe, needle):
    from joules.compress import parse_recipe

    with pytest.raises(ConfigError) as exc:
        parse_recipe(recipe)
    assert needle in str(exc.value)
