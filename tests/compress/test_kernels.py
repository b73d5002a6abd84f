"""The CPU int8/int4 kernels compute what the emulated path (dequantize + F.linear) computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from joules import formats
from joules import runtime_dtype as rd
from joules.compress.modules import kernels as K
from joules.compress.modules.linear import prepack
from joules.errors import ConfigError

U_BF16 = 2.0**-8  # bf16 unit roundoff

KERNEL_SPECS = {
    "int8-ch": "cpu-int8",
    "int8": "cpu-int8",
    "int4-g32": "cpu-int4",
    "int4-g64": "cpu-int4",
    "int4-g128": "cpu-int4",  # 192-wide rows: last group padded, kernel groups of 64
    "int4-ch": "cpu-int4",
    "uint4-asym-g32": "cpu-int4",
    "uint4-asym-g64-zpint": "cpu-int4",
    "int3-g64": "cpu-int4",
    "int2-g64": "cpu-int4",
}


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :3] *= 8  # a few high-magnitude input channels, as in real LLM weights
    return w


@pytest.mark.parametrize("spec", sorted(KERNEL_SPECS))
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernel_matches_emulated_fp32(spec: str, tokens: int) -> None:
    w = _weight(48, 192, seed=1)
    q = formats.get(spec).quantize(w)
    kernel = K.find_kernel(q)
    assert kernel is not None and kernel.name == KERNEL_SPECS[spec]
    packed = kernel.pack(q, torch.float32)
    x = torch.randn(2, tokens, 192, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(48)
    wd = q.dequantize()
    y = kernel.linear(x, packed, bias)
    ref = F.linear(x, wd, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    bound = 1e-5 * (x.abs() @ (wd.abs() + wd.abs().amax(1, keepdim=True)).T) + 1e-5
    assert ((y - ref).abs() <= bound).all()


@pytest.mark.parametrize("spec", sorted(KERNEL_SPECS))
def test_kernel_matches_emulated_bf16(spec: str) -> None:
    w = _weight(64, 256, seed=3)
    q = formats.get(spec).quantize(w)
    kernel = K.find_kernel(q)
    packed = kernel.pack(q, torch.bfloat16)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(4))
    wd = q.dequantize()
    y = kernel.linear(x, packed).float()  # activations run in bf16, result back in fp32
    emulated = F.linear(x.bfloat16(), wd.bfloat16()).float()
    # both round x identically; each then rounds weights (or scales, zeros) and the output once
    xb = x.bfloat16().float()
    bound = 2 * U_BF16 * (xb.abs() @ K.int4_bf16_magnitudes(q, wd).T) + 2 * U_BF16 * emulated.abs()
    assert ((y - emulated).abs() <= bound).all()
    # the bound is tight enough to catch a decoding off by 10 % (e.g. a wrong scale)
    assert ((F.linear(xb, wd * 1.1) - emulated).abs() > bound).any()


@pytest.mark.parametrize(
    "spec,device,reason",
    [
        ("nf4", "cpu", "not an integer format"),
        ("mxfp4", "cpu", "not an integer format"),
        ("int8-g32", "cpu", "group scales"),
        ("uint8-asym-ch", "cpu", "not symmetric"),
        ("int4-g16", "cpu", "no group size"),
    ],
)
def test_no_kernel_says_why(spec: str, device: str, reason: str) -> None:
    q = formats.get(spec).quantize(_weight(32, 128, seed=0))
    assert K.find_kernel(q, device) is None
    assert reason in K.why_no_kernel(q, device)


def test_int4_needs_rows_in_sixteens() -> None:
    q = formats.get("int4-g32").quantize(_weight(40, 128, seed=0))
    assert K.find_kernel(q) is None
    assert "multiple of 16" in K.why_no_kernel(q)


def test_not_on_other_devices() -> None:
    q = formats.get("int8-ch").quantize(_weight(32, 128, seed=0))
    assert not K.find_kernel(q).supports(q, "meta")
    assert "CPU only" in K.why_no_kernel(q, "meta")


def test_int4_group_is_the_largest_divisor() -> None:
    fmt = formats.get("int4-ch")
    assert K.int4_group(fmt.quantize(_weight(16, 576)), fmt) == 64
    assert K.int4_group(fmt.quantize(_weight(16, 1536)), fmt) == 256
    fmt = formats.get("int4-g128")
    assert K.int4_group(fmt.quantize(_weight(16, 576)), fmt) == 64


def test_packed_int4_is_smaller_than_fp32() -> None:
    q = formats.get("int4-g64").quantize(_weight(64, 256, seed=0))
    p = K.find_kernel(q).pack(q, torch.bfloat16)
    assert p.nbytes < 64 * 256  # 4-bit codes + bf16 (scale, zero) per 64: ~4.5 bits/weight
    assert p.tensors["scales_zeros"].dtype == torch.bfloat16


def test_compute_dtype_env_and_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp32")
    assert K.compute_dtype("cpu-int4").dtype == "fp32"
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="JOULES_KERNEL_DTYPE"):
        K.compute_dtype("cpu-int4")
    monkeypatch.delenv("JOULES_KERNEL_DTYPE")
    choice = K.probe("cpu-int8", reps=3)
    assert choice.dtype in K.DTYPES and choice.fp32_s > 0 and choice.bf16_s > 0
    assert choice.dtype == ("bf16" if choice.bf16_s < choice.fp32_s else "fp32")
    with pytest.raises(ConfigError, match="unknown kernel"):
        K.compute_dtype("cuda-magic")


# -- the speed probe: best of its repeats, the machine's load, pinned for quality work ---------


def _fake_probe(monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float, busy: bool):
    calls: list[str] = []

    def probe(kernel_name: str, reps: int = 15) -> K.DtypeChoice:
        calls.append(kernel_name)
        return K._verdict(kernel_name, fp32_s, bf16_s, {"busy": busy}, 1)

    monkeypatch.delenv("JOULES_KERNEL_DTYPE", raising=False)
    monkeypatch.setattr(K, "probe", probe)
    return calls


def test_time_call_keeps_the_best_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 4.0, 10.0, 10.25, 20.0, 22.0])  # repeats of 4 s, 0.25 s, 2 s
    monkeypatch.setattr(rd, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert K.best_time_s(lambda: torch.zeros(1), repeats=3) == 0.25  # the kernels' probe timer


def test_the_probe_records_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from joules.runtime_dtype import MachineLoad

    monkeypatch.setattr(K, "machine_load", lambda: MachineLoad(7.0, 0.0, 2))
    choice = K.probe("cpu-int8", reps=1)
    assert choice.load == {"load_1m": 7.0, "own_1m": 0.0, "cores": 2, "busy": True}
    assert choice.busy and "busy machine" in choice.reason


def test_a_busy_verdict_is_probed_again_at_prepack_not_per_forward(monkeypatch) -> None:
    from joules.compress import compress
    from joules.models import tiny_model

    monkeypatch.setattr(K, "_CHOICES", {})
    calls = _fake_probe(monkeypatch, 1.0, 3.0, busy=True)  # busy: bf16 looked slow
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=int4-g32)")
    x = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        model(x)
        model(x)
    assert calls == ["cpu-int4"]  # every forward reads the cached verdict
    assert K.compute_dtype("cpu-int4").dtype == "fp32"
    calls = _fake_probe(monkeypatch, 2.0, 0.5, busy=True)  # busy again: best of each is kept
    assert prepack(model) == {"kernel:cpu-int4/bf16": 14}
    choice = K.compute_dtype("cpu-int4")
    assert calls == ["cpu-int4"] and (choice.fp32_s, choice.bf16_s, choice.probes) == (1.0, 0.5, 2)
    calls = _fake_probe(monkeypatch, 1.0, 3.0, busy=False)  # quiet: replaces the busy verdict
    prepack(model)
    assert calls == ["cpu-int4"] and K.compute_dtype("cpu-int4").dtype == "fp32"
    prepack(model)
    assert calls == ["cpu-int4"]  # a quiet verdict stays


def test_pinned_activations_ignore_the_probe_but_not_an_explicit_request(monkeypatch) -> None:
    x = torch.zeros(1, 4)
    monkeypatch.setattr(K, "_CHOICES", {})
    calls = _fake_probe(monkeypatch, 1.0, 0.1, busy=False)  # the probe says bf16
    assert K.activation_dtype("cpu-int4", x) == torch.bfloat16
    with K.pinned_activations("fp32"):
        assert K.activation_dtype("cpu-int4", x) == torch.float32
        assert K.activation_dtype("cpu-int4", x.bfloat16()) == torch.bfloat16  # bf16 stays
        assert K.pinned_choice() == ("fp32", "pinned for quality work, no speed probe")
        monkeypatch.setenv("JOULES_KERNEL_DTYPE", "bf16")
        assert K.activation_dtype("cpu-int4", x) == torch.bfloat16
        assert K.pinned_choice() == ("bf16", "set by JOULES_KERNEL_DTYPE")
    assert calls == ["cpu-int4"]
    with pytest.raises(ConfigError, match="pinned activation dtype"), K.pinned_activations("fp8"):
        pass
