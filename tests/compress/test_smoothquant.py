"""smoothquant: fp outputs unchanged, activation ranges flattened, one-line errors."""

from __future__ import annotations

import pytest
import torch

from joules.compress import calibration_tokens, compress, parse_recipe
from joules.compress.steps.smoothquant import smoothing_scales
from joules.errors import ConfigError
from joules.models import tiny_model


def test_smoothing_leaves_fp_outputs_unchanged():
    model, tok, _ = tiny_model("llama", seed=0)
    ref, _, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cm = compress(model, "smoothquant(alpha=0.5)", calibration=calib)
    ids, _ = calibration_tokens(tok, n=2, length=32, seed=3)
    with torch.no_grad():
        r, s = ref(ids).logits, model(ids).logits
    assert torch.allclose(r, s, atol=1e-4, rtol=1e-4)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("input_layernorm" in n for n in changed)
    assert any("down_proj" in n for n in changed)
    assert "smoothquant" in cm.manifest.notes[0]


def test_scales_flatten_activation_range():
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(32, generator=g) + 0.1
    amax[3] = 50.0  # an outlier channel
    w = torch.randn(16, 32, generator=g)
    s = smoothing_scales(amax, [w], 0.5)
    flat = amax / s
    assert float(flat.max() / flat.min()) < float(amax.max() / amax.min())
    assert torch.equal(smoothing_scales(amax, [w], 0.0), 1 / w.abs().amax(0).clamp(min=1e-5))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range_is_one_line_error(alpha):
    with pytest.raises(ConfigError, match=r"alpha.*\[0, 1\]") as e:
        parse_recipe(f"smoothquant(alpha={alpha})")
    assert "\n" not in str(e.value)


def test_smoothquant_after_quantization_is_refused():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    with pytest.raises(ConfigError, match="smoothquant first"):
        compress(model, "rtn(format=int8-ch) | smoothquant", calibration=calib)
