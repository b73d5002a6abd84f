"""Compressed linears run through the CPU kernels, say so, and match the emulated path."""

from __future__ import annotations

import pytest
import torch

from joules.compress import compress, compressed_linears, linear_paths, load_compressed, set_kernels
from joules.compress.modules.linear import prepack
from joules.models import tiny_model


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, kernels: bool) -> torch.Tensor:
    set_kernels(model, kernels)
    with torch.no_grad():
        return model(_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("spec", "kernel"), [("int4-g32", "cpu-int4"), ("int8-ch", "cpu-int8")])
def test_kernel_path_equals_emulated_fp32(monkeypatch, spec: str, kernel: str) -> None:
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp32")
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, f"rtn(format={spec})")
    emulated = _logits(model, kernels=False)
    assert linear_paths(model) == {"emulated": 14}
    fast = _logits(model, kernels=True)
    assert linear_paths(model) == {f"kernel:{kernel}/fp32": 14}
    assert _rel(fast, emulated) <= 1e-5


def test_kernel_path_bf16_activations(monkeypatch) -> None:
    """bf16 activations round inputs and scales to 8 bits: the logits stay within bf16's
    rounding of the emulated path, and the path says bf16."""
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "bf16")
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=int4-g32)")
    emulated = _logits(model, kernels=False)
    fast = _logits(model, kernels=True)
    assert linear_paths(model) == {"kernel:cpu-int4/bf16": 14}
    assert 1e-5 < _rel(fast, emulated) <= 2e-2  # bf16 really ran, within its rounding
    lin = next(iter(compressed_linears(model).values()))
    assert lin.compute_dtype == torch.bfloat16


def test_no_kernel_falls_back_and_says_so() -> None:
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=nf4)")
    _logits(model, kernels=True)
    assert linear_paths(model) == {"emulated": 14}


def test_packed_once_and_after_load(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp32")
    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "rtn(format=uint4-asym-g32)")
    assert prepack(model) == {"kernel:cpu-int4/fp32": 14}
    lin = next(iter(compressed_linears(model).values()))
    state = lin.kernel_state
    before = _logits(model, kernels=True)
    assert lin.kernel_state is state  # forwards reuse the packing
    cm.save(tmp_path / "m", tok)
    loaded, _, _ = load_compressed(tmp_path / "m")
    after = _logits(loaded, kernels=True)
    assert linear_paths(loaded) == {"kernel:cpu-int4/fp32": 14}
    assert torch.equal(before, after)


def test_pruned_then_quantized_runs_the_kernel(monkeypatch) -> None:
    """2:4-pruned then int4: the codes already decode pruned weights to zero, so the kernel
    (which reads only the codes) computes the masked product: same logits, kernel path."""
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp32")
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "prune(method=magnitude, pattern=2:4) | rtn(format=int4-g32)")
    assert all(m.weight_mask is not None for m in compressed_linears(model).values())
    emulated = _logits(model, kernels=False)
    fast = _logits(model, kernels=True)
    assert linear_paths(model) == {"kernel:cpu-int4/fp32": 14}
    assert _rel(fast, emulated) <= 1e-5


def test_mask_not_implied_by_codes_stays_emulated(monkeypatch) -> None:
    """A keep-mask that the codes do not reproduce (set after quantization) forbids the kernel."""
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp32")
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=int4-g32)")
    _logits(model, kernels=True)
    lin = next(iter(compressed_linears(model).values()))
    mask = torch.ones(lin.out_features, lin.in_features, dtype=torch.bool)
    mask[:, ::2] = False
    lin.set_mask(mask)
    _logits(model, kernels=True)
    assert lin.path == "emulated"
    assert linear_paths(model) == {"kernel:cpu-int4/fp32": 13, "emulated": 1}


def test_prepack_decodes_emulated_layers_once() -> None:
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=nf4)")
    before = _logits(model, kernels=True)
    assert prepack(model, decode_emulated=True) == {"emulated": 14}
    lin = next(iter(compressed_linears(model).values()))
    dense = lin.dequantize_weight()
    assert lin.dequantize_weight() is dense  # decoded once, reused by every forward
    assert torch.equal(_logits(model, kernels=True), before)
    assert linear_paths(model) == {"emulated": 14}
