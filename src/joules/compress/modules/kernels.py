"""Real CPU weight-only kernels for packed integer weights (torch's own int8/int4 matmuls).

torch ships two CPU weight-only matmuls; this module packs joules' ``QuantizedTensor``s into
their layouts once (at convert/load time) and runs them:

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

Both kernels want scales in the activation dtype. On an AVX2-only CPU (no AVX512-BF16) they run
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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

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

    def supports(self, q: QuantizedTensor, device: str | torch.device = "cpu") -> bool:
        return self.why_not(q, torch.device(device).type) is None

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
        return x.is_floating_point() and self.why_not(layer.qtensor(), x.device.type) is None

    def run(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` through the kernel: packs the weight once per layer and activation dtype
        (kept in ``layer.kernel_state``) and records ``layer.path``."""
        dt = activation_dtype(self.name, x)
        st = layer.kernel_state
        if not (isinstance(st, PackedWeight) and st.kernel == self.name and st.compute_dtype == dt):
            st = layer.kernel_state = self.pack(layer.qtensor(), dt)  # once per layer and dtype
            layer.compute_dtype = dt
        # the path names the activation dtype: results must say what ran
        layer.path = f"kernel:{self.name}/{dtypes.short_name(dt)}"
        return self.linear(x, st, layer.bias)


KERNELS: Registry[Kernel] = Registry("kernel")


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the one kernel registry (tried in registration order)."""
    return KERNELS.register(kernel.name, kernel)


def kernels() -> list[Kernel]:
    return KERNELS.values()


def find_kernel(q: QuantizedTensor, device: str | torch.device = "cpu") -> Kernel | None:
    """The first registered kernel that serves ``q`` on ``device``, else None (emulate)."""
    dev = torch.device(device).type
    return next((k for k in KERNELS.values() if k.why_not(q, dev) is None), None)


def why_no_kernel(q: QuantizedTensor, device: str | torch.device = "cpu") -> str:
    """One line per kernel saying why it does not serve ``q`` (for ``layer.path`` reasons)."""
    dev = torch.device(device).type
    return "; ".join(f"{k.name}: {k.why_not(q, dev)}" for k in KERNELS.values())


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


def _common_why_not(q: QuantizedTensor, device: str) -> tuple[IntFormat | None, str | None]:
    if device != "cpu":
        return None, f"CPU only (tensor is on {device})"
    if len(q.shape) != 2:
        return None, f"needs a 2-D weight, got shape {tuple(q.shape)}"
    fmt = _int_format(q)
    if fmt is None:
        return None, f"'{q.spec}' is not an integer format"
    return fmt, None


# --------------------------------------------------------------------------------------------
# cpu-int8: aten._weight_int8pack_mm
# --------------------------------------------------------------------------------------------


def _int8_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device)
    if why:
        return why
    c = fmt.cfg
    if c.bits != 8 or not c.symmetric:
        return f"'{q.spec}' is not symmetric 8-bit"
    if c.grouping.kind == "group":
        return f"'{q.spec}' has group scales; the kernel takes one scale per row"
    return None


def _int8_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    fmt = _int_format(q)
    assert fmt is not None and _int8_why_not(q, "cpu") is None, q.spec
    n, k = q.shape
    w = (_codes(q, fmt) - fmt.qmax).to(torch.int8).contiguous()  # [n, k] in [-127, 127]
    scales = _row_params(q, fmt, "scales").reshape(n).to(dtype).contiguous()
    return PackedWeight("cpu-int8", (n, k), dtype, {"weight": w, "scales": scales})


def _int8_mm(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, p.tensors["weight"], p.tensors["scales"])


register(
    Kernel(
        "cpu-int8",
        _int8_why_not,
        _int8_pack,
        _int8_mm,
        "aten._weight_int8pack_mm: int8 weight, one scale per output row",
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


def _int4_why_not(q: QuantizedTensor, device: str) -> str | None:
    fmt, why = _common_why_not(q, device)
    if why:
        return why
    c = fmt.cfg
    n, k = q.shape
    if c.bits > 4:
        return f"'{q.spec}' has {c.bits} bits; the kernel holds 4"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    if int4_group(q, fmt) is None:
        return (
            f"no group size in {INT4_GROUPS} divides both the row ({k}) and the group of '{q.spec}'"
        )
    return None


def _int4_pack(q: QuantizedTensor, dtype: torch.dtype) -> PackedWeight:
    fmt = _int_format(q)
    assert fmt is not None and _int4_why_not(q, "cpu") is None, q.spec
    c = fmt.cfg
    n, k = q.shape
    G = int4_group(q, fmt)
    assert G is not None
    codes = _codes(q, fmt)
    scales = _row_params(q, fmt, "scales")  # [n, groups per row]
    if c.symmetric:  # x = (code - qmax) * s = (t - 8) * s with t = code + 8 - qmax
        t = codes + (8 - fmt.qmax)
        zeros = torch.zeros_like(scales)
    elif c.int_zero_point:  # x = (code - z) * s = (code - 8) * s + (8 - z) * s
        t = codes
        zeros = (8 - _row_params(q, fmt, "offsets")) * scales
    else:  # x = code * s + min = (code - 8) * s + (min + 8 s)
        t = codes
        zeros = _row_params(q, fmt, "offsets") + 8 * scales
    # one (scale, zero) per kernel group j: joules group floor(j * G / span)
    span = c.grouping.size if c.grouping.kind == "group" else k
    idx = torch.arange(k // G) * G // span
    sz = torch.stack([scales[:, idx], zeros[:, idx]], dim=2)  # [n, k/G, 2]
    sz = sz.transpose(0, 1).contiguous().to(dtype)  # [k/G, n, 2]
    # Uses the CPU layout (inner_k_tiles does not change it there).
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(t.contiguous(), 1)
    return PackedWeight("cpu-int4", (n, k), dtype, {"weight": packed, "scales_zeros": sz}, G)


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
    KERNELS.get(kernel_name)  # an unknown name raises the registry's error
    cached = _CHOICES.get(kernel_name)
    if refresh or cached is None:
        _CHOICES[kernel_name] = probe(kernel_name)
    elif reprobe_busy and cached.busy and cached.probes < MAX_BUSY_PROBES:
        _CHOICES[kernel_name] = _reprobe(cached)
    return _CHOICES[kernel_name]


# The activation dtype pinned for quality work (None: speed work, the probe decides).
_PINNED: ContextVar[str | None] = ContextVar("joules_pinned_activations", default=None)


@contextmanager
def pinned_activations(dtype: str = "fp32") -> Iterator[None]:
    """Within: every kernel runs fp32/fp16 activations in ``dtype``, never in a probe's choice
    (an explicit ``JOULES_KERNEL_DTYPE`` still wins). Evaluation and compression run here, so
    their figures are the same on an idle and a loaded machine, and on any CPU's probe."""
    if dtype not in DTYPES:
        raise ConfigError(f"pinned activation dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    token = _PINNED.set(dtype)
    try:
        yield
    finally:
        _PINNED.reset(token)


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
    "compute_dtype",
    "find_kernel",
    "kernels",
    "pinned_activations",
    "pinned_choice",
    "probe",
    "register",
    "reprobe_busy",
    "why_no_kernel",
]
