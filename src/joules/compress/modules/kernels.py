"""Real weight-only kernels for packed integer weights (torch's own int8/int4 matmuls), on the
CPU and on CUDA, in one registry keyed by (format family, device).

torch ships two CPU weight-only matmuls and one CUDA one; this module packs joules'
``QuantizedTensor``s into their layouts once (at convert/load time) and runs them. On the CPU:

- ``cpu-int8``: ``aten._weight_int8pack_mm(x, w_int8[n, k], scales[n])`` computes
  ``x @ (w * scales[:, None]).T``. Serves symmetric ``int8-ch`` and ``int8`` (per tensor): our
  codes are ``q + 127`` with ``q`` in [-127, 127], so ``w = code - 127``.
- ``cpu-int4``: ``aten._weight_int4pack_mm_for_cpu(x, packed, G, sz[k/G, n, 2])`` with
  ``packed = aten._convert_weight_to_int4pack_for_cpu(t[n, k] int32, _)`` decodes each weight as
  ``(t - 8) * scale + zero`` with one (scale, zero) per run of ``G`` in {32, 64, 128, 256}
  along a row (N divisible by 16). It serves every integer format of <= 4 bits whose group size
  (or row, for ``-ch``/per tensor) is a multiple of such a G dividing the row:
  symmetric ``int{b}`` (codes ``q + qmax``): ``t = code + 8 - qmax``, ``zero = 0``;
  ``uint{b}-asym`` (``x = code * s + min``): ``t = code``, ``zero = min + 8 * s``;
  ``uint{b}-asym-zpint`` (``x = (code - z) * s``): ``t = code``, ``zero = (8 - z) * s``.
  A joules group of N = m * G shares its scale over m kernel groups (scales repeated).

On CUDA (``cuda_capability()`` asks torch; :func:`capability_query` replaces it, so CPU
tests pick kernels for any GPU):

- ``cuda-int4``: ``aten._weight_int4pack_mm(x bf16 [m, k], packed, G, sz[k/G, n, 2] bf16)``
  (tinygemm, Ampere's ``mma.sync`` bf16 tiles: **sm80+**) with
  ``packed = aten._convert_weight_to_int4pack(u8[n, k/2], inner_k_tiles)``: the CUDA variant
  takes two codes a byte, column ``2j`` in the high nibble, and tiles them for the tensor
  cores (``inner_k_tiles`` in {8, 4, 2}, the largest whose ``16 x tiles`` divides the row).
  It decodes ``(t - 8) * scale + zero`` with one bf16 fma: the same ``t``, scales and zeros
  as ``cpu-int4`` above, in bf16 (torchao's "zero point domain float": ``zero = min + 8 s``).
  Rows of N = m * G, G in {32, 64, 128, 256}; ``out_features`` a multiple of 8; activations
  run in bf16 whatever their dtype (the result is cast back). :func:`cuda_int4_operands`
  builds the kernel's inputs with plain torch and :func:`cuda_int4_reference` computes, in
  plain torch, what the kernel computes from them: the CPU tests check both.
- ``cuda-int8``: the int8 weight-only path torchao (``Int8WeightOnlyConfig``) and gpt-fast use
  on CUDA: ``F.linear(x, w_int8.to(x.dtype)) * scales[n]``, which torch.compile fuses into one
  kernel reading int8 weights (torch has no int8 weight-only CUDA kernel; in eager the weight
  is converted at every call). Symmetric ``int8-ch`` / ``int8``; activations keep their dtype.

Where a kernel of the format's family exists on the device but does not serve the weight (a
GPU below sm80, a row it cannot tile), :func:`fallback_reason` says why in one line; the layer
runs ``emulated`` and keeps the reason (``CompressedLinear.path_detail``).

The CPU kernels want scales in the activation dtype. On an AVX2-only CPU (no AVX512-BF16) they run
*slower* than fp32 ``F.linear`` with fp32 activations and faster with bf16 ones
(``benchmarks/linear_kernels.py``), so for speed the compute dtype is chosen per CPU by
:func:`compute_dtype`: a one-time probe of each kernel at 1536x576, one token, fp32 against bf16
activations, best of its repeats, with the machine's load recorded (a verdict taken on a busy
machine is probed again at the next
:func:`joules.compress.modules.linear.prepack`, never in the middle of a run;
``JOULES_KERNEL_DTYPE=fp32|bf16`` overrides it). bf16 rounds the scales (fp16 in storage) and
the activations to 8 significant bits: compare the kernel with the emulated path run at the
same activation dtype.

A quality figure must not depend on a timing probe. Inside :func:`pinned_activations` (every
evaluation and every compression runs there) fp32/fp16 activations run in the pinned dtype
(fp32) whatever the probe says; only an explicit ``JOULES_KERNEL_DTYPE`` overrides it, and the
evaluation records that (:func:`pinned_choice`). bf16 inputs always stay bf16: a bf16 model
computes in bf16 everywhere.

    >>> import torch
    >>> from joules import formats
    >>> from joules.compress.modules.kernels import find_kernel
    >>> q = formats.get("int4-g32").quantize(torch.randn(64, 128))
    >>> kernel = find_kernel(q)
    >>> kernel.name
    'cpu-int4'
    >>> packed = kernel.pack(q, torch.float32)        # once, cached by the layer
    >>> x = torch.randn(3, 128)
    >>> y = kernel.linear(x, packed)                  # [3, 64]
    >>> bool(torch.allclose(y, x @ q.dequantize().T, atol=1e-4))
    True
    >>> find_kernel(formats.get("nf4").quantize(torch.randn(64, 128))) is None
    True
    >>> with capability_query(lambda: (7, 5)):           # a T4, asked for on a CPU machine
    ...     fallback_reason(q, "cuda")
    'cuda-int4: needs sm80+, this GPU is sm75'
    >>> with capability_query(lambda: (9, 0)):           # an H100
    ...     find_kernel(q, "cuda").name
    'cuda-int4'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from joules import dtypes, formats
from joules.errors import ConfigError
from joules.formats.base import QuantizedTensor
from joules.formats.integer import IntFormat
from joules.formats.packing import unpack
from joules.registry import Registry
from joules.runtime_dtype import MAX_BUSY_PROBES, best_time_s, machine_load

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten._weight_int4pack_mm_for_cpu accepts
DTYPES = dtypes.choices("fp32", "bf16")  # the activation dtypes the kernels run in


@dataclass
class PackedWeight:
    """A weight in a kernel's layout, with its scales in the kernel's compute dtype."""

    kernel: str
    shape: tuple[int, int]  # (out_features, in_features)
    compute_dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    group_size: int = 0  # kernel group G (int4 only)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: str | torch.device) -> PackedWeight:
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self


@dataclass(frozen=True)
class Kernel:
    """A real matmul for some formats on some device: the one kernel type, in one registry.

    ``why_not(q, device)`` is None when the kernel serves ``q`` there, else a one-line reason;
    ``pack(q, dtype)`` builds its layout (once); ``mm(x2d, packed)`` multiplies
    ``x2d [tokens, k]`` (already in ``packed.compute_dtype``) by the weight's transpose.
    A ``CompressedLinear`` asks :meth:`serves` and calls :meth:`run` (the first registered
    kernel that serves it wins).
    """

    name: str
    why_not: Callable[[QuantizedTensor, str], str | None]
    pack: Callable[[QuantizedTensor, torch.dtype], PackedWeight]
    mm: Callable[[torch.Tensor, PackedWeight], torch.Tensor]
    doc: str = ""
    device: str = "cpu"  # the device type it runs on (the registry's second key)
    family: str = ""  # the format family it serves ("int8" | "int4": see format_family)
    # the activation dtype it computes in for an input of dtype x (None: the CPU speed probe,
    # see activation_dtype); and why it refuses inputs of a dtype (None: it takes any float)
    act_dtype: Callable[[torch.dtype], torch.dtype] | None = None
    dtype_why_not: Callable[[torch.dtype], str | None] | None = None

    def supports(self, q: QuantizedTensor, device: str | torch.device = "cpu") -> bool:
        return self.why_not(q, torch.device(device).type) is None

    def why_not_input(self, q: QuantizedTensor, device: str, dtype: torch.dtype) -> str | None:
        """None when the kernel computes ``x @ W.T`` for ``x`` of ``dtype`` on ``device``, else
        a one-line reason (the weight's, then the activations')."""
        if not dtype.is_floating_point:
            return f"activations of dtype {dtype} are not floating point"
        why = self.why_not(q, device)
        if why is None and self.dtype_why_not is not None:
            why = self.dtype_why_not(dtype)
        return why

    def linear(
        self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.linear(x, W, bias)`` through the kernel: x [..., k] in any float dtype; the
        result comes back in x's dtype (activations run in ``packed.compute_dtype``)."""
        n, k = packed.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(packed.compute_dtype).contiguous()
        y = self.mm(x2, packed).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, n)

    # -- a compressed linear's matmul (``layer``: joules.compress.modules.linear.CompressedLinear) --
    def serves(self, layer: Any, x: torch.Tensor) -> bool:
        """True when this kernel can compute ``layer(x)``: a floating-point input, and a weight
        the kernel serves on ``x``'s device."""
        return self.why_not_input(layer.qtensor(), x.device.type, x.dtype) is None

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``x``'s activations run in through this kernel."""
        if self.act_dtype is not None:
            return self.act_dtype(x.dtype)
        return activation_dtype(self.name, x)

    def run(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` through the kernel: packs the weight once per layer and activation dtype
        (kept in ``layer.kernel_state``) and records ``layer.path``."""
        dt = self.compute_dtype_for(x)
        st = layer.kernel_state
        if not (isinstance(st, PackedWeight) and st.kernel == self.name and st.compute_dtype == dt):
            st = layer.kernel_state = self.pack(layer.qtensor(), dt)  # once per layer and dtype
            layer.compute_dtype = dt
        # the path names the activation dtype: results must say what ran (set only when it
        # changes: a compiled step then has no attribute write to replay at every call)
        path = f"kernel:{self.name}/{dtypes.short_name(dt)}"
        if layer.path != path:
            layer.path = path
        return self.linear(x, st, layer.bias)


KERNELS: Registry[Kernel] = Registry("kernel")


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the one kernel registry (tried in registration order)."""
    return KERNELS.register(kernel.name, kernel)


def kernels(device: str | None = None) -> list[Kernel]:
    """The registered kernels (of one device type, when given), in the order they are tried."""
    return [k for k in KERNELS.values() if device is None or k.device == device]


def find_kernel(
    q: QuantizedTensor, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Kernel | None:
    """The first registered kernel of ``device`` that serves ``q`` (and activations of
    ``dtype``, when given), else None (emulate)."""
    dev = torch.device(device).type
    for k in KERNELS.values():
        if k.device != dev:
            continue
        why = k.why_not(q, dev) if dtype is None else k.why_not_input(q, dev, dtype)
        if why is None:
            return k
    return None


def why_no_kernel(q: QuantizedTensor, device: str | torch.device = "cpu") -> str:
    """One line per kernel saying why it does not serve ``q`` (for ``layer.path`` reasons)."""
    dev = torch.device(device).type
    return "; ".join(f"{k.name}: {k.why_not(q, dev)}" for k in KERNELS.values())


def format_family(q: QuantizedTensor) -> str | None:
    """The kernel family of ``q``'s format: ``int8`` (8-bit integers), ``int4`` (integers of
    at most 4 bits), else None (no kernel anywhere handles it: always emulated)."""
    fmt = _int_format(q)
    if fmt is None or len(q.shape) != 2:
        return None
    bits = fmt.cfg.bits
    return "int8" if bits == 8 else "int4" if bits <= 4 else None


def fallback_reason(
    q: QuantizedTensor, device: str | torch.device, dtype: torch.dtype | None = None
) -> str | None:
    """Why ``q`` is emulated on ``device`` although a kernel of its format family exists there
    (``"cuda-int4: needs sm80+, this GPU is sm75"``), or None: a kernel serves it, or none of
    this device handles its family (an nf4 weight is emulated everywhere, for no fault)."""
    dev = torch.device(device).type
    family = format_family(q)
    mine = [k for k in KERNELS.values() if k.device == dev and k.family == family]
    if family is None or not mine:
        return None
    reasons = []
    for k in mine:
        why = k.why_not(q, dev) if dtype is None else k.why_not_input(q, dev, dtype)
        if why is None:
            return None
        reasons.append(f"{k.name}: {why}")
    return "; ".join(reasons)


# --------------------------------------------------------------------------------------------
# Shared decoding of integer formats
# --------------------------------------------------------------------------------------------


def _int_format(q: QuantizedTensor) -> IntFormat | None:
    fmt = formats.get(q.spec)
    return fmt if isinstance(fmt, IntFormat) else None


def _codes(q: QuantizedTensor, fmt: IntFormat) -> torch.Tensor:
    """Unsigned codes as int32 [n, k]."""
    n, k = q.shape
    return unpack(q.parts["codes"], fmt.cfg.bits, n * k).reshape(n, k).to(torch.int32)


def _row_params(q: QuantizedTensor, fmt: IntFormat, key: str) -> torch.Tensor:
    """A per-group parameter part as fp32 [n, groups_per_row]."""
    n, k = q.shape
    g = fmt.cfg.grouping
    p = q.parts[key]
    if key == "offsets" and fmt.cfg.int_zero_point:
        p = unpack(p, fmt.cfg.bits, g.count((n, k)))
    p = p.float().reshape(-1)
    if g.kind == "tensor":
        return p.reshape(1, 1).expand(n, 1)
    return p.reshape(n, -1)


def _common_why_not(
    q: QuantizedTensor, device: str, want: str = "cpu"
) -> tuple[IntFormat | None, str | None]:
    """(the integer format of ``q``, None) when a ``want``-device kernel could take it, else
    (None, why not)."""
    if device != want:
        return None, f"{want.upper()} only (tensor is on {device})"
    if len(q.shape) != 2:
        return None, f"needs a 2-D weight, got shape {tuple(q.shape)}"
    fmt = _int_format(q)
    if fmt is None:
        return None, f"'{q.spec}' is not an integer format"
    return fmt, None


# --------------------------------------------------------------------------------------------
# cpu-int8: aten._weight_int8pack_mm
# --------------------------------------------------------------------------------------------


def _int8_layout_why_not(fmt: Any, q: QuantizedTensor) -> str | None:
    """Why ``q`` is not per-row symmetric int8 (what both int8 kernels take), or None."""
    c = fmt.cfg
    if c.bits != 8 or not c.symmetric:
        return f"'{q.spec}' is not symmetric 8-bit"
    if c.grouping.kind == "group":
        return f"'{q.spec}' has group scales; the kernel takes one scale per row"
    return None


def _int8_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device)
    return why or _int8_layout_why_not(fmt, q)


def _int8_tensors(q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Signed int8 codes ``[n, k]`` in [-127, 127] and one scale per row in ``dtype``."""
    fmt = _int_format(q)
    assert fmt is not None and _int8_layout_why_not(fmt, q) is None, q.spec
    n, _ = q.shape
    w = (_codes(q, fmt) - fmt.qmax).to(torch.int8).contiguous()
    scales = _row_params(q, fmt, "scales").reshape(n).to(dtype).contiguous()
    return {"weight": w, "scales": scales}


def _int8_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    return PackedWeight(
        "cpu-int8", (int(q.shape[0]), int(q.shape[1])), dtype, _int8_tensors(q, dtype)
    )


def _int8_mm(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, p.tensors["weight"], p.tensors["scales"])


register(
    Kernel(
        "cpu-int8",
        _int8_why_not,
        _int8_pack,
        _int8_mm,
        "aten._weight_int8pack_mm: int8 weight, one scale per output row",
        device="cpu",
        family="int8",
    )
)


# --------------------------------------------------------------------------------------------
# cpu-int4: aten._weight_int4pack_mm_for_cpu
# --------------------------------------------------------------------------------------------


def int4_group(q: QuantizedTensor, fmt: IntFormat) -> int | None:
    """The largest kernel group G that divides the row and the format's group (or row)."""
    k = q.shape[1]
    g = fmt.cfg.grouping
    span = g.size if g.kind == "group" else k
    return next((G for G in INT4_GROUPS if k % G == 0 and span % G == 0), None)


def _int4_layout_why_not(fmt: Any, q: QuantizedTensor, rows_multiple: int) -> str | None:
    """Why ``q`` does not fit an int4 kernel whose output rows come in ``rows_multiple``s (16 on
    the CPU, 8 for tinygemm), or None."""
    n, k = q.shape
    if fmt.cfg.bits > 4:
        return f"'{q.spec}' has {fmt.cfg.bits} bits; the kernel holds 4"
    if n % rows_multiple:
        return f"out_features {n} is not a multiple of {rows_multiple}"
    if int4_group(q, fmt) is None:
        return (
            f"no group size in {INT4_GROUPS} divides both the row ({k}) and the group of '{q.spec}'"
        )
    return None


def _int4_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device)
    return why or _int4_layout_why_not(fmt, q, 16)


def _int4_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    assert _int4_why_not(q, "cpu") is None, q.spec
    n, k = q.shape
    t, sz, G = int4_codes_and_scales(q, dtype)
    # Uses the CPU layout (inner_k_tiles does not change it there).
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(t, 1)
    return PackedWeight("cpu-int4", (n, k), dtype, {"weight": packed, "scales_zeros": sz}, G)


def int4_zero_points(q: QuantizedTensor) -> torch.Tensor:
    """The zero point ``z`` [n, groups per row] of ``w = (t - 8) * s + z``, the int4 kernels'
    decoding of ``q``: 0 when symmetric; ``(8 - z) * s`` for ``x = (code - z) * s``
    (``-zpint``); ``min + 8 * s`` for ``x = code * s + min``."""
    fmt = _int_format(q)
    assert fmt is not None, q.spec
    scales = _row_params(q, fmt, "scales")
    if fmt.cfg.symmetric:
        return torch.zeros_like(scales)
    offsets = _row_params(q, fmt, "offsets")
    return (8 - offsets) * scales if fmt.cfg.int_zero_point else offsets + 8 * scales


def int4_bf16_magnitudes(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Per element of ``q``'s dequantized weight ``w`` [n, k], the size of what the int4
    kernels round to bf16 while decoding ``w = (t - 8) * s + z``: ``|w - z|`` (the scaled code)
    plus ``|z|`` (the group's zero point; ``|w|`` alone when symmetric). Times bf16's unit
    roundoff, a bound on the kernels' decoding error."""
    fmt = _int_format(q)
    assert fmt is not None, q.spec
    if fmt.cfg.symmetric:
        return w.abs()
    k = w.shape[1]
    z = int4_zero_points(q).repeat_interleave(fmt.cfg.grouping.size, dim=1)[:, :k]
    return (w - z).abs() + z.abs()


def int4_codes_and_scales(
    q: QuantizedTensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What both int4 kernels decode as ``w = (t - 8) * scale + zero``: ``t`` int32 [n, k] in
    [0, 15], ``scales_zeros`` [k/G, n, 2] in ``dtype`` (tinygemm's layout: ``[..., 0]`` the
    scale, ``[..., 1]`` the zero, one pair per kernel group of ``G`` along a row) and ``G``."""
    fmt = _int_format(q)
    assert fmt is not None, q.spec
    c = fmt.cfg
    k = q.shape[1]
    G = int4_group(q, fmt)
    assert G is not None, q.spec
    codes = _codes(q, fmt)
    scales = _row_params(q, fmt, "scales")  # [n, groups per row]
    # symmetric: x = (code - qmax) * s = (t - 8) * s with t = code + 8 - qmax
    t = codes + (8 - fmt.qmax) if c.symmetric else codes
    zeros = int4_zero_points(q)
    # one (scale, zero) per kernel group j: joules group floor(j * G / span)
    span = c.grouping.size if c.grouping.kind == "group" else k
    idx = torch.arange(k // G, device=scales.device) * G // span
    sz = torch.stack([scales[:, idx], zeros[:, idx]], dim=2)  # [n, k/G, 2]
    sz = sz.transpose(0, 1).contiguous().to(dtype)  # [k/G, n, 2]
    return t.contiguous(), sz, G


def _int4_mm(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, p.tensors["weight"], p.group_size, p.tensors["scales_zeros"]
    )


register(
    Kernel(
        "cpu-int4",
        _int4_why_not,
        _int4_pack,
        _int4_mm,
        "aten._weight_int4pack_mm_for_cpu: 4-bit weight, (scale, zero) per group of 32..256",
        device="cpu",
        family="int4",
    )
)


# --------------------------------------------------------------------------------------------
# CUDA: the GPU's compute capability, asked through a replaceable query
# --------------------------------------------------------------------------------------------

CapabilityQuery = Callable[[], "tuple[int, int] | None"]


def torch_cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability (major, minor), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


_capability_query: CapabilityQuery = torch_cuda_capability


def cuda_capability() -> tuple[int, int] | None:
    """The compute capability the CUDA kernels are chosen for (see :func:`capability_query`)."""
    return _capability_query()


@contextmanager
def capability_query(query: CapabilityQuery) -> Iterator[None]:
    """Within, the CUDA kernels ask ``query()`` for the GPU's compute capability instead of
    torch, so a CPU-only test can stand for any GPU::

        with capability_query(lambda: (7, 5)):      # a T4
            find_kernel(q, "cuda")                  # None: cuda-int4 needs sm80+
    """
    global _capability_query
    saved = _capability_query
    _capability_query = query
    try:
        yield
    finally:
        _capability_query = saved


def _sm(cap: tuple[int, int]) -> str:
    return f"sm{cap[0]}{cap[1]}"


# --------------------------------------------------------------------------------------------
# cuda-int8: the int8 weight-only path torchao and gpt-fast use on CUDA
# --------------------------------------------------------------------------------------------


def _cuda_int8_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device, want="cuda")
    if why:
        return why
    why = _int8_layout_why_not(fmt, q)
    if why is None and cuda_capability() is None:
        return "no CUDA device is visible"
    return why


def _cuda_int8_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    return PackedWeight(
        "cuda-int8", (int(q.shape[0]), int(q.shape[1])), dtype, _int8_tensors(q, dtype)
    )


def _cuda_int8_mm(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    # x: [tokens, k] -> [tokens, n]. torchao's int8 weight-only linear (0.18: Int8Tensor's
    # per-row path, `torch.mm(x, w_int8.t().to(x.dtype)) * scale`) and gpt-fast's
    # WeightOnlyInt8Linear are this line: there is no int8 weight-only CUDA kernel in torch;
    # under torch.compile inductor fuses the int8 -> activation-dtype conversion into the
    # product (a decode-sized matmul becomes one kernel reading int8 weights). In eager it
    # converts the whole weight at every call, slower than the dense layer.
    return F.linear(x, p.tensors["weight"].to(x.dtype)) * p.tensors["scales"]


register(
    Kernel(
        "cuda-int8",
        _cuda_int8_why_not,
        _cuda_int8_pack,
        _cuda_int8_mm,
        "F.linear(x, int8 weight -> x.dtype) * row scales, fused by torch.compile (torchao's "
        "int8 weight-only CUDA path)",
        device="cuda",
        family="int8",
        act_dtype=lambda dt: dt,  # fp16, bf16 or fp32 activations, as they come
    )
)


# --------------------------------------------------------------------------------------------
# cuda-int4: aten._weight_int4pack_mm (tinygemm), sm80+
# --------------------------------------------------------------------------------------------

CUDA_INT4_MIN_CAPABILITY = (8, 0)  # tinygemm's mma.sync m16n8k16 bf16 tiles: Ampere and later
INNER_K_TILES = (8, 4, 2)  # tinygemm's inner k-tiles (16 values each); the largest that fits


def inner_k_tiles(k: int) -> int | None:
    """The largest inner k-tile count whose span (``tiles x 16``) divides the row ``k``."""
    return next((t for t in INNER_K_TILES if k % (t * 16) == 0), None)


def _cuda_int4_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device, want="cuda")
    why = why or _int4_layout_why_not(fmt, q, 8)
    if why:
        return why
    k = q.shape[1]
    if inner_k_tiles(k) is None:  # unreachable while every group size is a multiple of 32
        return f"in_features {k} is not a multiple of 32"
    cap = cuda_capability()
    if cap is None:
        return "no CUDA device is visible"
    if cap < CUDA_INT4_MIN_CAPABILITY:
        return f"needs {_sm(CUDA_INT4_MIN_CAPABILITY)}+, this GPU is {_sm(cap)}"
    return None


def _cuda_int4_dtype_why_not(dtype: torch.dtype) -> str | None:
    """tinygemm computes in bf16: fp32/fp16 activations are rounded to bf16, except inside
    :func:`pinned_activations` (quality work), where they stay emulated at their precision."""
    pinned = _PINNED.get()
    if pinned is None or dtype == torch.bfloat16:
        return None
    chosen, _ = pinned_choice(pinned)
    if chosen == "bf16":
        return None
    return f"activations pinned to {chosen} for quality work; the kernel computes in bf16"


def cuda_int4_operands(q: QuantizedTensor) -> dict[str, Any]:
    """What ``aten._convert_weight_to_int4pack`` (CUDA) and ``aten._weight_int4pack_mm`` take,
    built on ``q``'s device with plain torch (so a CPU test checks it):

    - ``codes``: uint8 [n, k/2], two 4-bit codes a byte, column ``2j`` in the *high* nibble
      and ``2j + 1`` in the low one (torch's int4mm.cu reads them so, as torchao packs them);
    - ``scales_zeros``: bf16 [k/G, n, 2], the scale and the float zero of each kernel group;
    - ``group_size`` G and ``inner_k_tiles``.

    The kernel decodes ``w = (t - 8) * scale + zero`` (one bf16 fma), ``t`` the code. joules'
    codes convert as for ``cpu-int4`` (see the module docstring): symmetric ``t = code + 8 -
    qmax``, zero 0; ``-asym`` ``t = code``, ``zero = min + 8 s``; ``-asym-zpint`` ``t = code``,
    ``zero = (8 - z) s``.
    """
    t, sz, G = int4_codes_and_scales(q, torch.bfloat16)
    codes = (t[:, ::2] << 4 | t[:, 1::2]).to(torch.uint8).contiguous()  # [n, k/2]
    tiles = inner_k_tiles(q.shape[1])
    assert tiles is not None, q.shape
    return {"codes": codes, "scales_zeros": sz, "group_size": G, "inner_k_tiles": tiles}


def int4_reference_weight(
    codes: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    """The bf16 weight [n, k] that tinygemm decodes from :func:`cuda_int4_operands`' tensors,
    in plain torch: unpack the nibbles (high first), then ``(t - 8) * scale + zero`` rounded
    once to bf16, as the kernel's ``__hfma2`` does."""
    n = codes.shape[0]
    t = torch.stack([codes >> 4, codes & 0xF], dim=2).reshape(n, -1).float()  # [n, k]
    s = scales_zeros[..., 0].float().T.repeat_interleave(group_size, dim=1)  # [n, k]
    z = scales_zeros[..., 1].float().T.repeat_interleave(group_size, dim=1)
    # (t - 8) * s is exact in fp32 (a bf16 times an integer of 4 bits) and so is the sum with
    # a bf16 zero of similar size (24 bits hold both): the one rounding is into bf16, as in the
    # kernel's fused multiply-add
    return ((t - 8) * s + z).to(torch.bfloat16)


def cuda_int4_reference(x: torch.Tensor, operands: dict[str, Any]) -> torch.Tensor:
    """What ``aten._weight_int4pack_mm(x, pack(codes), G, scales_zeros)`` computes, in plain
    torch on any device: bf16 activations [tokens, k] times the decoded bf16 weight,
    accumulated in fp32 (the tensor cores' accumulator), the result rounded to bf16."""
    w = int4_reference_weight(operands["codes"], operands["group_size"], operands["scales_zeros"])
    return (x.to(torch.bfloat16).float() @ w.float().T).to(torch.bfloat16)


def _cuda_int4_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    assert _cuda_int4_why_not(q, "cuda") is None, q.spec
    assert dtype == torch.bfloat16, dtype
    n, k = q.shape
    ops = cuda_int4_operands(q)
    packed = torch.ops.aten._convert_weight_to_int4pack(ops["codes"], ops["inner_k_tiles"])
    return PackedWeight(
        "cuda-int4",
        (n, k),
        dtype,
        {"weight": packed, "scales_zeros": ops["scales_zeros"]},
        ops["group_size"],
    )


def _cuda_int4_mm(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    # x: [tokens, k] bf16, contiguous -> [tokens, n] bf16
    return torch.ops.aten._weight_int4pack_mm(
        x, p.tensors["weight"], p.group_size, p.tensors["scales_zeros"]
    )


register(
    Kernel(
        "cuda-int4",
        _cuda_int4_why_not,
        _cuda_int4_pack,
        _cuda_int4_mm,
        "aten._weight_int4pack_mm (tinygemm): 4-bit weight, bf16 (scale, zero) per group of "
        "32..256, bf16 activations, sm80+",
        device="cuda",
        family="int4",
        act_dtype=lambda dt: torch.bfloat16,
        dtype_why_not=_cuda_int4_dtype_why_not,
    )
)


# --------------------------------------------------------------------------------------------
# Compute dtype: fp32 or bf16 activations, chosen per CPU
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeChoice:
    """The activation dtype a kernel runs in on this machine, and why."""

    kernel: str
    dtype: str  # "fp32" | "bf16"
    reason: str
    fp32_s: float | None = None  # probe: best seconds per call, 1 token at 1536x576
    bf16_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    load: dict[str, object] | None = None  # runtime_dtype.MachineLoad.to_dict() when probed
    probes: int = 1  # busy probes merged into this verdict (best time per dtype)

    @property
    def busy(self) -> bool:
        """The probe ran beside other jobs (its verdict is probed again at the next prepack)."""
        return bool(self.load and self.load.get("busy"))


_CHOICES: dict[str, DtypeChoice] = {}


def probe(kernel_name: str, reps: int = 15) -> DtypeChoice:
    """Time the kernel at 1536x576 (a SmolLM2-135M MLP shape), one token, fp32 vs bf16."""
    kernel = KERNELS.get(kernel_name)
    spec = "int8-ch" if kernel_name == "cpu-int8" else "int4-g64"
    q = formats.get(spec).quantize(
        torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    )
    load = machine_load()
    times = {}
    for name, dt in DTYPES.items():
        p = kernel.pack(q, dt)
        x = torch.randn(1, 576).to(dt)
        times[name] = best_time_s(lambda p=p, x=x: kernel.mm(x, p), reps)
    return _verdict(kernel_name, times["fp32"], times["bf16"], load.to_dict(), 1)


def _verdict(
    kernel_name: str, fp32_s: float, bf16_s: float, load: dict[str, object], probes: int
) -> DtypeChoice:
    best = "bf16" if bf16_s < fp32_s else "fp32"
    busy = f", best of {probes} probes on a busy machine" if load.get("busy") else ""
    reason = (
        f"probe: {kernel_name} at 1536x576, 1 token: bf16 activations "
        f"{fp32_s / bf16_s:.2f}x the speed of fp32{busy}"
    )
    return DtypeChoice(kernel_name, best, reason, fp32_s, bf16_s, load=load, probes=probes)


def _reprobe(old: DtypeChoice) -> DtypeChoice:
    """Probe again a verdict taken on a busy machine: a quiet probe replaces it, a busy one is
    merged into it (best time per dtype)."""
    new = probe(old.kernel)
    if not new.busy or old.fp32_s is None or old.bf16_s is None:
        return new
    return _verdict(
        old.kernel,
        min(new.fp32_s or float("inf"), old.fp32_s),
        min(new.bf16_s or float("inf"), old.bf16_s),
        new.load or {},
        old.probes + 1,
    )


def _env_dtype() -> str | None:
    env = os.environ.get("JOULES_KERNEL_DTYPE", "").strip().lower()
    if env and env not in DTYPES:
        raise ConfigError(f"JOULES_KERNEL_DTYPE={env!r}: use fp32 or bf16 (or unset it)")
    return env or None


def compute_dtype(
    kernel_name: str, refresh: bool = False, *, reprobe_busy: bool = False
) -> DtypeChoice:
    """The activation dtype of ``kernel_name`` on this CPU for speed (probe cached per process).

    ``JOULES_KERNEL_DTYPE=fp32|bf16`` fixes it without probing. ``reprobe_busy`` probes again a
    cached verdict taken on a busy machine (up to ``MAX_BUSY_PROBES`` probes); the per-forward
    lookup never does, so a layer's path does not change in the middle of a run.
    """
    env = _env_dtype()
    if env:
        return DtypeChoice(kernel_name, env, "set by JOULES_KERNEL_DTYPE")
    if KERNELS.get(kernel_name).device != "cpu":  # an unknown name raises the registry's error
        raise ConfigError(
            f"{kernel_name} computes in a fixed dtype: only the CPU kernels' dtype is probed"
        )
    cached = _CHOICES.get(kernel_name)
    if refresh or cached is None:
        _CHOICES[kernel_name] = probe(kernel_name)
    elif reprobe_busy and cached.busy and cached.probes < MAX_BUSY_PROBES:
        _CHOICES[kernel_name] = _reprobe(cached)
    return _CHOICES[kernel_name]


# The activation dtype pinned for quality work (None: speed work, the probe decides).
_PINNED: ContextVar[str | None] = ContextVar("joules_pinned_activations", default=None)
# Bumped whenever a pinned_activations block opens or closes: a layer keys its kernel choice on
# it (a plain int, which torch.compile can guard on; it cannot trace a ContextVar lookup).
_PIN_EPOCH = 0


def pin_epoch() -> int:
    """A number that changes whenever :func:`pinned_activations` enters or leaves."""
    return _PIN_EPOCH


@contextmanager
def pinned_activations(dtype: str = "fp32") -> Iterator[None]:
    """Within: every kernel runs fp32/fp16 activations in ``dtype``, never in a probe's choice
    (an explicit ``JOULES_KERNEL_DTYPE`` still wins). Evaluation and compression run here, so
    their figures are the same on an idle and a loaded machine, and on any CPU's probe."""
    if dtype not in DTYPES:
        raise ConfigError(f"pinned activation dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    global _PIN_EPOCH
    token = _PINNED.set(dtype)
    _PIN_EPOCH += 1
    try:
        yield
    finally:
        _PINNED.reset(token)
        _PIN_EPOCH += 1


def pinned_choice(dtype: str = "fp32") -> tuple[str, str]:
    """``(dtype, why)`` that fp32/fp16 activations run in under ``pinned_activations(dtype)``."""
    env = _env_dtype()
    if env:
        return env, "set by JOULES_KERNEL_DTYPE"
    return dtype, "pinned for quality work, no speed probe"


def reprobe_busy() -> None:
    """Probe again every verdict taken on a busy machine (not under :func:`pinned_activations`).
    :func:`joules.compress.modules.linear.prepack` calls it at load time, before any timed run, so a
    layer's path never changes in the middle of one."""
    if _PINNED.get() is None:
        for name, choice in list(_CHOICES.items()):
            if choice.busy:
                compute_dtype(name, reprobe_busy=True)


# --------------------------------------------------------------------------------------------
# Activation dtype of a compressed linear's kernel call
# --------------------------------------------------------------------------------------------


def activation_dtype(kernel_name: str, x: torch.Tensor) -> torch.dtype:
    """bf16 inputs stay bf16; fp32/fp16 inputs run in the pinned dtype inside
    :func:`pinned_activations`, else in the dtype chosen for speed on this CPU."""
    if x.dtype == torch.bfloat16:
        return torch.bfloat16
    pinned = _PINNED.get()
    if pinned is not None:
        return DTYPES[pinned_choice(pinned)[0]]
    return DTYPES[compute_dtype(kernel_name).dtype]


__all__ = [
    "DTYPES",
    "KERNELS",
    "DtypeChoice",
    "Kernel",
    "PackedWeight",
    "activation_dtype",
    "capability_query",
    "compute_dtype",
    "cuda_capability",
    "cuda_int4_operands",
    "cuda_int4_reference",
    "fallback_reason",
    "find_kernel",
    "format_family",
    "int4_bf16_magnitudes",
    "int4_reference_weight",
    "int4_zero_points",
    "kernels",
    "pin_epoch",
    "pinned_activations",
    "pinned_choice",
    "probe",
    "register",
    "reprobe_busy",
    "why_no_kernel",
]
