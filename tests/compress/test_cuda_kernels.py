"""The CUDA kernels' dispatch and packing, checked on a CPU: which kernel serves which device,
format, activation dtype, shape and GPU (a faked compute capability), the one-line reason when
none does, and that the int4 operands decode, in plain torch, to what the emulated path and
torch's CPU int4 kernel compute. What runs on a real GPU is ``benchmarks/gpu_check.py``'s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from joules import formats
from joules.compress.modules import kernels as K
from joules.compress.modules.linear import CompressedLinear, fallback_reasons
from joules.errors import ConfigError

H100 = (9, 0)
A100 = (8, 0)
T4 = (7, 5)
U_BF16 = 2.0**-8  # bf16 unit roundoff


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :3] *= 8  # a few high-magnitude input channels, as in real LLM weights
    return w


def _q(spec: str, n: int = 64, k: int = 256, seed: int = 0) -> formats.QuantizedTensor:
    return formats.get(spec).quantize(_weight(n, k, seed))


def _name(q: formats.QuantizedTensor, device: str, dtype: torch.dtype | None = None) -> str | None:
    kernel = K.find_kernel(q, device, dtype)
    return kernel.name if kernel else None


# -- which kernel: device, format, GPU ---------------------------------------------------------

CUDA_SPECS = {
    "int4-g32": "cuda-int4",
    "int4-g64": "cuda-int4",
    "int4-g128": "cuda-int4",
    "int4-ch": "cuda-int4",
    "uint4-asym-g64": "cuda-int4",
    "uint4-asym-g32-zpint": "cuda-int4",
    "int3-g64": "cuda-int4",
    "int2-g64": "cuda-int4",
    "int8-ch": "cuda-int8",
    "int8": "cuda-int8",
    "nf4": None,
    "mxfp4": None,
    "int8-g32": None,
    "uint8-asym-ch": None,
}


@pytest.mark.parametrize("spec", sorted(CUDA_SPECS))
def test_each_format_gets_its_kernel_by_device(spec: str) -> None:
    q = _q(spec)
    with K.capability_query(lambda: H100):
        assert _name(q, "cuda") == CUDA_SPECS[spec]
        on_cpu = _name(q, "cpu")  # a GPU in the machine changes nothing on the CPU
    assert on_cpu is None or on_cpu.startswith("cpu-")
    assert (on_cpu is None) == (CUDA_SPECS[spec] is None)
    assert _name(q, "meta") is None


def test_the_gpu_generation_decides_int4_and_says_why() -> None:
    q4, q8 = _q("int4-g64"), _q("int8-ch")
    for cap in (A100, (8, 6), (8, 9), H100, (10, 0)):
        with K.capability_query(lambda cap=cap: cap):
            assert _name(q4, "cuda") == "cuda-int4"
    with K.capability_query(lambda: T4):
        assert _name(q4, "cuda") is None
        assert K.fallback_reason(q4, "cuda") == "cuda-int4: needs sm80+, this GPU is sm75"
        assert _name(q8, "cuda") == "cuda-int8"  # int8 needs no tensor-core tiles
    with K.capability_query(lambda: None):
        assert _name(q4, "cuda") is None and _name(q8, "cuda") is None
        assert "no CUDA device is visible" in K.fallback_reason(q4, "cuda")


def test_the_real_query_is_restored_and_says_no_gpu_here() -> None:
    with K.capability_query(lambda: H100):
        assert K.cuda_capability() == H100
    assert K.cuda_capability() == K.torch_cuda_capability()
    if not torch.cuda.is_available():
        assert K.cuda_capability() is None and _name(_q("int4-g64"), "cuda") is None


@pytest.mark.parametrize(
    ("spec", "n", "k", "kernel", "reason"),
    [
        ("int4-g64", 24, 256, "cuda-int4", None),  # rows in eights suffice on CUDA
        ("int4-g64", 20, 256, None, "out_features 20 is not a multiple of 8"),
        ("int4-g16", 64, 256, None, "no group size in (256, 128, 64, 32)"),
        ("int4-ch", 64, 48, None, "divides both the row (48)"),
        ("int4-ch", 64, 96, "cuda-int4", None),  # G = 32, two inner k-tiles
        ("int8-g32", 64, 256, None, "cuda-int8: 'int8-g32' has group scales"),
        ("uint8-asym-ch", 64, 256, None, "is not symmetric 8-bit"),
        ("int6-g64", 64, 256, None, None),  # no 6-bit family: emulated, no kernel's fault
        ("nf4", 64, 256, None, None),
    ],
)
def test_shapes_and_groups(spec: str, n: int, k: int, kernel: str | None, reason: str | None):
    q = _q(spec, n, k)
    with K.capability_query(lambda: H100):
        assert _name(q, "cuda") == kernel
        why = K.fallback_reason(q, "cuda")
    if reason is None:
        assert why is None
    else:
        assert reason in why


def test_cpu_int4_wants_sixteen_rows_where_cuda_wants_eight() -> None:
    q = _q("int4-g64", 24, 256)
    assert _name(q, "cpu") is None
    assert K.fallback_reason(q, "cpu") == "cpu-int4: out_features 24 is not a multiple of 16"


@pytest.mark.parametrize("k", [96, 192, 256, 576, 1536, 2048, 8192])
def test_inner_k_tiles_is_the_largest_that_divides_the_row(k: int) -> None:
    tiles = K.inner_k_tiles(k)
    assert k % (tiles * 16) == 0
    assert all(k % (t * 16) for t in K.INNER_K_TILES if t > tiles)


# -- which kernel: activation dtype --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int4_takes_any_float_activations_and_computes_in_bf16(dtype: torch.dtype) -> None:
    q4, q8 = _q("int4-g64"), _q("int8-ch")
    with K.capability_query(lambda: H100):
        k4 = K.find_kernel(q4, "cuda", dtype)
        k8 = K.find_kernel(q8, "cuda", dtype)
    assert k4.name == "cuda-int4" and k4.compute_dtype_for(torch.zeros(1, dtype=dtype)) == (
        torch.bfloat16
    )
    assert k8.name == "cuda-int8" and k8.compute_dtype_for(torch.zeros(1, dtype=dtype)) == dtype
    assert K.find_kernel(q4, "cuda", torch.int64) is None


def test_pinned_fp32_keeps_int4_off_the_bf16_kernel() -> None:
    """Quality work pins activations to fp32: tinygemm computes only in bf16, so an fp32 input
    stays emulated there (a bf16 model's bf16 input still takes the kernel)."""
    q = _q("int4-g64")
    with K.capability_query(lambda: H100), K.pinned_activations("fp32"):
        assert K.find_kernel(q, "cuda", torch.float32) is None
        assert "pinned to fp32" in K.fallback_reason(q, "cuda", torch.float32)
        assert _name(q, "cuda", torch.bfloat16) == "cuda-int4"
        assert _name(_q("int8-ch"), "cuda", torch.float32) == "cuda-int8"
    with K.capability_query(lambda: H100):
        assert _name(q, "cuda", torch.float32) == "cuda-int4"


def test_cuda_kernels_are_not_probed() -> None:
    with pytest.raises(ConfigError, match="fixed dtype"):
        K.compute_dtype("cuda-int4")
    assert [k.name for k in K.kernels("cuda")] == ["cuda-int8", "cuda-int4"]
    assert all(k.device == "cpu" for k in K.kernels("cpu"))


# -- a compressed layer's choice, path and reason -----------------------------------------------


def _layer(spec: str, n: int = 64, k: int = 256) -> CompressedLinear:
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_weight(n, k))
    return CompressedLinear.from_linear(lin, formats.get(spec).quantize(lin.weight.data))


def _cuda_input(dtype: torch.dtype) -> SimpleNamespace:
    """What a layer reads of its input to choose a kernel: a device and a dtype (a CUDA tensor
    cannot be made here)."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def test_a_layer_chooses_by_device_and_reports_its_path() -> None:
    lin = _layer("int4-g64")
    with K.capability_query(lambda: H100):
        kernel, why = lin.choose_kernel("cuda", torch.bfloat16)
        assert kernel.name == "cuda-int4" and why is None
        assert lin._select(_cuda_input(torch.float16)).name == "cuda-int4"
    assert lin.path == "kernel:cuda-int4" and lin.fallback is None
    lin._kernel_key = None
    with K.capability_query(lambda: T4):
        assert lin._select(_cuda_input(torch.bfloat16)) is None
    assert lin.path == "emulated"  # the word results count stays the same
    assert lin.path_detail == "emulated: cuda-int4: needs sm80+, this GPU is sm75"
    assert "path=emulated: cuda-int4: needs sm80+" in repr(lin)
    model = torch.nn.Sequential(lin, _layer("nf4"))
    model[1]._select(_cuda_input(torch.bfloat16))
    assert model[1].path_detail == "emulated"  # nothing on CUDA decodes nf4: no fault to report
    assert fallback_reasons(model) == {"cuda-int4: needs sm80+, this GPU is sm75": 1}


def test_a_layer_says_why_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = _layer("int8-ch")
    with K.capability_query(lambda: H100):
        assert lin.choose_kernel("cuda", torch.float16)[0].name == "cuda-int8"
        monkeypatch.setenv("JOULES_KERNELS", "0")
        kernel, why = lin.choose_kernel("cuda", torch.float16)
    assert kernel is None and "switched off" in why


def test_a_layer_rechooses_when_activations_are_pinned() -> None:
    lin = _layer("int4-g64")
    x = _cuda_input(torch.float32)
    with K.capability_query(lambda: H100):
        assert lin._select(x).name == "cuda-int4"
        with K.pinned_activations("fp32"):
            assert lin._select(x) is None
            assert "pinned to fp32" in lin.path_detail
        assert lin._select(x).name == "cuda-int4"


# -- packing: what the CUDA int4 kernel is given, and what it computes from it ------------------

INT4_SPECS = ["int4-g32", "int4-g64", "int4-g128", "int4-ch", "uint4-asym-g64",
              "uint4-asym-g32-zpint", "int3-g64"]  # fmt: skip


def _dequant_bf16_params(q: formats.QuantizedTensor) -> torch.Tensor:
    """joules' decoding of ``q`` [n, k] in fp32 with its scales (and zeros) rounded to bf16,
    as tinygemm holds them: the exact weight the kernel must decode before its last rounding."""
    fmt = formats.get(q.spec)
    k = q.shape[1]
    codes = K._codes(q, fmt).float()
    span = fmt.cfg.grouping.size if fmt.cfg.grouping.kind == "group" else k
    per_col = torch.arange(k) // span

    def col(p: torch.Tensor) -> torch.Tensor:
        return p[:, per_col]

    s = col(K._row_params(q, fmt, "scales")).bfloat16().float()
    if fmt.cfg.symmetric:
        return (codes - fmt.qmax) * s
    off = col(K._row_params(q, fmt, "offsets"))
    if fmt.cfg.int_zero_point:
        z = ((8 - off) * col(K._row_params(q, fmt, "scales"))).bfloat16().float()
    else:
        z = (off + 8 * col(K._row_params(q, fmt, "scales"))).bfloat16().float()
    return (codes - 8) * s + z


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_int4_operands_have_the_kernels_layout(spec: str) -> None:
    q = _q(spec, 48, 384)
    ops = K.cuda_int4_operands(q)
    n, k = q.shape
    G = ops["group_size"]
    assert ops["codes"].dtype == torch.uint8 and ops["codes"].shape == (n, k // 2)
    assert ops["scales_zeros"].dtype == torch.bfloat16
    assert ops["scales_zeros"].shape == (k // G, n, 2)
    assert G in (32, 64, 128, 256) and ops["inner_k_tiles"] == K.inner_k_tiles(k)
    # column 2j in the high nibble, 2j + 1 in the low one: the codes come back in order
    t, _, _ = K.int4_codes_and_scales(q, torch.bfloat16)
    assert torch.equal(ops["codes"][:, 0] >> 4, t[:, 0].to(torch.uint8))
    back = torch.stack([ops["codes"] >> 4, ops["codes"] & 0xF], dim=2).reshape(n, k)
    assert torch.equal(back.to(torch.int32), t)


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_int4_reference_decodes_joules_weight_exactly(spec: str) -> None:
    """The kernel's decoding of the operands is joules' own decoding with bf16 scales and
    zeros, to the last bit of the bf16 it rounds to."""
    q = _q(spec, 48, 384, seed=5)
    ops = K.cuda_int4_operands(q)
    w = K.int4_reference_weight(ops["codes"], ops["group_size"], ops["scales_zeros"])
    assert w.dtype == torch.bfloat16 and w.shape == tuple(q.shape)
    assert torch.equal(w, _dequant_bf16_params(q).bfloat16())
    # and joules' full-precision weight to within bf16 rounding of scale, zero and result
    wd = q.dequantize()
    assert ((w.float() - wd).abs() <= 2 * U_BF16 * K.int4_bf16_magnitudes(q, wd) + 1e-12).all()


@pytest.mark.parametrize("spec", INT4_SPECS)
@pytest.mark.parametrize("tokens", [1, 6])
def test_int4_reference_matches_emulated_within_bf16(spec: str, tokens: int) -> None:
    q = _q(spec, 64, 256, seed=3)
    ops = K.cuda_int4_operands(q)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(4))
    y = K.cuda_int4_reference(x, ops).float()
    wd = q.dequantize()
    emulated = F.linear(x.bfloat16(), wd.bfloat16()).float()
    xb = x.bfloat16().float()
    # each side rounds the weight (or its scale and zero) and the output once in bf16
    bound = 3 * U_BF16 * (xb.abs() @ K.int4_bf16_magnitudes(q, wd).T) + 2 * U_BF16 * emulated.abs()
    assert ((y - emulated).abs() <= bound).all()
    assert ((F.linear(xb, wd * 1.1) - emulated).abs() > bound).any()  # the bound can fail


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_int4_reference_matches_torchs_cpu_int4_kernel(spec: str) -> None:
    """The same (t, scales_zeros) through torch's real CPU int4 kernel, which decodes with the
    same ``(t - 8) * scale + zero``: the layout of scales and zeros is the kernels' own."""
    q = _q(spec, 64, 256, seed=7)
    t, sz, G = K.int4_codes_and_scales(q, torch.bfloat16)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(t, 1)
    cpu = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, sz).float()
    ref = K.cuda_int4_reference(x, K.cuda_int4_operands(q)).float()
    w = K.int4_reference_weight(K.cuda_int4_operands(q)["codes"], G, sz).float()
    bound = 2 * U_BF16 * (x.float().abs() @ w.abs().T) + 1e-6
    assert ((cpu - ref).abs() <= bound).all()
    # nibbles read the other way round decode another weight: the check would catch it
    swapped = dict(K.cuda_int4_operands(q))
    c = swapped["codes"]
    swapped["codes"] = (c << 4 | c >> 4).to(torch.uint8)
    assert ((K.cuda_int4_reference(x, swapped).float() - cpu).abs() > bound).any()


def test_cuda_int8_computes_the_emulated_product() -> None:
    """cuda-int8's arithmetic is plain torch: run it on CPU tensors (the pack needs a GPU the
    query vouches for) against the emulated product."""
    q = _q("int8-ch", 64, 256, seed=9)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(10))
    with K.capability_query(lambda: T4):
        kernel = K.find_kernel(q, "cuda")
        packed = kernel.pack(q, torch.float32)
    assert packed.tensors["weight"].dtype == torch.int8
    y = kernel.linear(x, packed)
    ref = F.linear(x, q.dequantize())
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_a_layers_dispatch_traces_whole_under_torch_compile() -> None:
    """The compiled runtime traces a layer's forward as one graph (fullgraph): the kernel choice
    must key on what dynamo can guard (a pin counter, not a ContextVar lookup). Checked on the
    CPU kernel with bf16 activations, whose Python is the CUDA kernels' but for the op."""
    lin = _layer("int4-g64").to(torch.bfloat16)
    model = torch.nn.Sequential(lin)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(lambda t: model(t), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), eager) and lin.path == "kernel:cpu-int4/bf16"
    with K.pinned_activations("fp32"):  # the pin counter moved: re-chosen, no trace error
        assert torch.equal(compiled(x), eager)
