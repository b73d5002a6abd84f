"""`CompressedLinear`: a linear layer whose weight is a packed `QuantizedTensor`.

    >>> import torch
    >>> from joules import formats
    >>> from joules.compress.modules.linear import CompressedLinear
    >>> lin = torch.nn.Linear(64, 32)
    >>> q = CompressedLinear.from_linear(lin, formats.get("nf4").quantize(lin.weight.data))
    >>> y = q(torch.randn(2, 64))
    >>> q.path, q.weight_nbytes < lin.weight.numel() * 4
    ('emulated', True)

The packed parts (codes, scales, minima, codebooks...) are buffers named ``qweight_<part>``, so
``state_dict`` and safetensors carry them as they are: the model's bytes really shrink.

``forward`` picks its matmul from the one kernel registry
(:data:`joules.compress.modules.kernels.KERNELS`, keyed by format and device): the first registered
kernel that serves this layer and input runs it (``path == "kernel:<name>/<dtype>"``);
otherwise the weight is dequantized and multiplied (``path == "emulated"``). Where a kernel of
the format's family exists on that device but does not serve this layer (a GPU older than sm80
for ``cuda-int4``, a row the kernel cannot tile), ``layer.fallback`` says why and
``layer.path_detail`` reads ``"emulated: cuda-int4: needs sm80+, this GPU is sm75"``.

Every module type a step puts into a model registers itself with :func:`register_module`, with
``export_config()`` and ``from_config(cfg)``: a saved directory lists them in its manifest, and
loading rebuilds the structure before reading the state dict.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from joules import dtypes, formats
from joules.compress.modules.kernels import (
    KERNELS,
    Kernel,
    fallback_reason,
    pin_epoch,
    reprobe_busy,
)
from joules.formats.base import QuantizedTensor
from joules.formats.packing import pack, unpack
from joules.registry import Registry

# Manifests spell dtypes by their torch names ("bfloat16", "uint8"): joules.dtypes maps them.
dtype_name = dtypes.torch_name
dtype_from_name = dtypes.to_torch


# ----------------------------------------------------------------------------------------------
# Module registry (save/load rebuilds structure from the manifest)
# ----------------------------------------------------------------------------------------------

MODULES: Registry[type[nn.Module]] = Registry(
    "compressed module type", hint="a manifest written by a newer joules? upgrade joules"
)


def register_module(type_name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a module type that compression steps put into models (for save/load)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        MODULES.register(type_name, cls)
        cls.module_type = type_name  # type: ignore[attr-defined]
        return cls

    return deco


def module_class(type_name: str) -> type[nn.Module]:
    return MODULES.get(type_name)


# ----------------------------------------------------------------------------------------------
# Kernels (the registry lives in joules.compress.modules.kernels)
# ----------------------------------------------------------------------------------------------


def kernels_enabled() -> bool:
    """``JOULES_KERNELS=0`` forces the emulated path everywhere (for comparisons)."""
    return os.environ.get("JOULES_KERNELS", "1") not in ("0", "off", "false")


# ----------------------------------------------------------------------------------------------
# Pruning masks (1 bit per weight)
# ----------------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask as a flat uint8 bitmap (1 bit per weight)."""
    return pack(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return unpack(bits, 1, n).reshape(shape).bool()


class MaskedMixin:
    """A ``mask_bits`` buffer (packed keep-mask) read as ``weight_mask`` (bool, cached)."""

    _mask_cache: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor) -> None:
        self.register_buffer("mask_bits", pack_mask(mask))  # type: ignore[attr-defined]
        self._mask_cache = None
        invalidate = getattr(self, "invalidate", None)
        if invalidate is not None:  # a compressed layer re-checks its kernel against the mask
            invalidate()

    @property
    def weight_mask(self) -> torch.Tensor | None:
        bits = self._buffers.get("mask_bits")  # type: ignore[attr-defined]
        if bits is None:
            return None
        if self._mask_cache is None or self._mask_cache.device != bits.device:
            self._mask_cache = unpack_mask(bits, (self.out_features, self.in_features))  # type: ignore[attr-defined]
        return self._mask_cache


@register_module("pruned_linear")
class PrunedLinear(MaskedMixin, nn.Linear):
    """An ``nn.Linear`` whose pruned weights are zero, with its keep-mask stored as a bitmap."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> PrunedLinear:
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            m.weight.copy_(linear.weight * mask)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        m.set_mask(mask)
        return m

    def export_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.weight.dtype),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PrunedLinear:
        m = cls(
            cfg["in_features"],
            cfg["out_features"],
            cfg["bias"],
            dtype=dtype_from_name(cfg["dtype"]),
        )
        m.register_buffer("mask_bits", torch.empty(0, dtype=torch.uint8))
        return m

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "mask_bits"
        if key in state_dict:  # the bitmap's size is known only from the file
            self._buffers["mask_bits"] = torch.empty_like(state_dict[key])
            self._mask_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args)


# ----------------------------------------------------------------------------------------------
# CompressedLinear
# ----------------------------------------------------------------------------------------------


@register_module("compressed_linear")
class CompressedLinear(MaskedMixin, nn.Module):
    """``y = x @ dequantize(W).T + b`` with W stored packed in a number format of the lab.

    Optional extras that later steps attach: ``act_quant`` (a module applied to the input),
    ``sparse`` (a module holding a sparse fp16 part added to the dequantized weight).
    """

    module_type = "compressed_linear"

    def __init__(
        self,
        spec: str,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        parts: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = dtype
        self.meta = dict(meta or {})
        self.part_names = list((parts or {}).keys())
        for name, (shape, dt) in (parts or {}).items():
            self.register_buffer(f"qweight_{name}", torch.empty(shape, dtype=dt))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.act_quant: nn.Module | None = None
        self.sparse: nn.Module | None = None
        self.cache_dequantized = False
        self.use_kernels = True
        self.kernel_state: Any = None
        self._kernel: Kernel | None = None
        self._kernel_key: Any = None
        self._w_cache: torch.Tensor | None = None
        self._mask_implied: bool | None = None
        self.path = "emulated"
        self.fallback: str | None = None  # why emulated although a kernel family exists here

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, qt: QuantizedTensor) -> CompressedLinear:
        """Wrap a quantized weight (of ``linear``'s shape) and ``linear``'s bias."""
        if tuple(qt.shape) != tuple(linear.weight.shape):
            raise ValueError(f"quantized shape {qt.shape} != weight {tuple(linear.weight.shape)}")
        parts = {k: (tuple(v.shape), v.dtype) for k, v in qt.parts.items()}
        m = cls(
            qt.spec,
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.dtype,
            parts,
            qt.meta,
        )
        for k, v in qt.parts.items():
            getattr(m, f"qweight_{k}").copy_(v)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        return m.to(linear.weight.device)

    def export_config(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.weight_dtype),
            "parts": {
                n: [
                    list(getattr(self, f"qweight_{n}").shape),
                    dtype_name(getattr(self, f"qweight_{n}").dtype),
                ]
                for n in self.part_names
            },
            "meta": self.meta,
            "extra_buffers": {
                n: [list(b.shape), dtype_name(b.dtype)]
                for n, b in self.named_buffers(recurse=False)
                if not n.startswith("qweight_")
            },
            "act_quant": _child_config(self.act_quant),
            "sparse": _child_config(self.sparse),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CompressedLinear:
        parts = {n: (tuple(s), dtype_from_name(d)) for n, (s, d) in cfg["parts"].items()}
        m = cls(
            cfg["spec"],
            cfg["in_features"],
            cfg["out_features"],
            cfg["bias"],
            dtype_from_name(cfg["dtype"]),
            parts,
            cfg.get("meta"),
        )
        for n, (shape, dt) in cfg.get("extra_buffers", {}).items():
            m.register_buffer(n, torch.empty(tuple(shape), dtype=dtype_from_name(dt)))
        for attr in ("act_quant", "sparse"):
            sub = cfg.get(attr)
            if sub:
                setattr(m, attr, module_class(sub["type"]).from_config(sub["config"]))
        return m

    # -- weight ----------------------------------------------------------------------------------
    def qtensor(self) -> QuantizedTensor:
        parts = {n: getattr(self, f"qweight_{n}") for n in self.part_names}
        return QuantizedTensor(
            self.spec, (self.out_features, self.in_features), self.weight_dtype, parts, self.meta
        )

    @property
    def format(self) -> formats.Format:
        return formats.get(self.spec)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (plus the sparse part, if any)."""
        n = self.qtensor().nbytes
        if self.sparse is not None:
            n += int(getattr(self.sparse, "nbytes", 0))
        return n

    def dequantize_weight(self) -> torch.Tensor:
        """The weight as the format decodes it (plus the sparse part), in ``weight_dtype``."""
        if self._w_cache is not None:
            return self._w_cache
        w = self.format.dequantize(self.qtensor())
        mask = self.weight_mask
        if mask is not None:  # pruned weights are exactly zero whatever the format's grid
            w = w * mask
        if self.sparse is not None:
            w = self.sparse.add_to(w)  # type: ignore[operator]
        w = w.to(self.weight_dtype)
        if self.cache_dequantized:
            self._w_cache = w
        return w

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (read-only view for code that inspects ``.weight``)."""
        return self.dequantize_weight()

    def _apply(self, fn: Any, recurse: bool = True) -> CompressedLinear:
        # Packed parts keep their storage dtypes (fp16 scales stay fp16 under model.to(bf16));
        # only their device follows. The compute dtype follows the cast.
        parts = {n: self._buffers.pop(f"qweight_{n}") for n in self.part_names}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=self.weight_dtype))
            for n, t in parts.items():
                self._buffers[f"qweight_{n}"] = t.to(probe.device)
        if probe.is_floating_point():
            self.weight_dtype = probe.dtype
        self.invalidate()
        return self

    def invalidate(self) -> None:
        """Forget cached dequantized weights and kernel packings (after editing the parts)."""
        self._w_cache = None
        self._mask_implied = None
        self.kernel_state = None
        self._kernel = None
        self._kernel_key = None

    # -- forward ---------------------------------------------------------------------------------
    def choose_kernel(self, device: str, dtype: torch.dtype) -> tuple[Kernel | None, str | None]:
        """The kernel an input of ``dtype`` on ``device`` (a device type: ``cpu``, ``cuda``)
        runs through, and, when none does, why (None: no kernel of this device handles the
        format at all, e.g. nf4). Nothing is packed or run: tests ask it for a faked GPU."""
        if not (self.use_kernels and kernels_enabled()):
            return None, "kernels switched off (JOULES_KERNELS=0 or set_kernels(model, False))"
        if self.sparse is not None:
            return None, "a sparse part is added to the decoded weight"
        if not self._mask_is_implied():
            return None, "pruned weights do not decode to zero, and the kernels read only codes"
        q = self.qtensor()
        for k in KERNELS.values():
            if k.device == device and k.why_not_input(q, device, dtype) is None:
                return k, None
        return None, fallback_reason(q, device, dtype)

    def _select(self, x: torch.Tensor) -> Kernel | None:
        # a pinned activation dtype (quality work) decides whether bf16-only kernels serve
        key = (x.device.type, x.dtype, self.use_kernels and kernels_enabled(), pin_epoch())
        if key == self._kernel_key:
            return self._kernel
        chosen, why = self.choose_kernel(x.device.type, x.dtype)
        self._kernel, self._kernel_key = chosen, key
        self.path = f"kernel:{chosen.name}" if chosen else "emulated"
        self.fallback = None if chosen else why
        return chosen

    @property
    def path_detail(self) -> str:
        """``path`` with the reason an emulated layer is not on a kernel of its device, where
        one exists for its format family: ``"emulated: cuda-int4: needs sm80+, this GPU is
        sm75"`` (``path`` itself stays ``emulated``, the word results and reports count)."""
        if self.path == "emulated" and self.fallback:
            return f"emulated: {self.fallback}"
        return self.path

    def _mask_is_implied(self) -> bool:
        """True when there is no keep-mask, or when the codes already decode every pruned weight
        to exactly zero (a prune-then-quantize recipe on a grid with an exact zero): a kernel
        that reads only the codes then computes the masked product exactly."""
        mask = self.weight_mask
        if mask is None:
            return True
        if self._mask_implied is None:
            w = self.format.dequantize(self.qtensor())
            self._mask_implied = bool((w[~mask] == 0).all())
        return self._mask_implied

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        if self.act_quant is not None:
            x = self.act_quant(x)
        k = self._select(x)
        if k is not None:
            return k.run(self, x)
        w = self.dequantize_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, format={self.spec}, path={self.path_detail}"
        )


def _child_config(m: nn.Module | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"type": m.module_type, "config": m.export_config()}  # type: ignore[attr-defined]


@contextlib.contextmanager
def decoded(module: nn.Module, *, cache: bool) -> Iterator[None]:
    """Inside, ``module``'s compressed linears decode their weight and run a dense matmul in the
    activations' dtype instead of a weight-only kernel; the values are exactly the format's (a
    kernel computes the same product in another order and, on a speed probe's word, maybe in
    bf16). The weight-only kernels are built for decode-sized inputs: on calibration batches
    and 512-token evaluation windows the dense matmul is far faster (fp32 int4 kernels took
    253 s for what decoding did in 2 s on a Xeon with AMX).

    ``cache``: keep each decoded weight until the block exits (calibration: one block, many
    forwards) instead of decoding per forward (evaluation: one layer's dense weight at a time,
    whatever the model's size)."""
    layers = [m for m in module.modules() if isinstance(m, CompressedLinear)]
    saved = [(m.use_kernels, m.cache_dequantized, m._w_cache) for m in layers]
    for m in layers:
        m.use_kernels, m._kernel_key = False, None
        m.cache_dequantized = m.cache_dequantized or cache
    try:
        yield
    finally:
        for m, (kern, keep, w) in zip(layers, saved, strict=True):
            m.use_kernels, m.cache_dequantized, m._w_cache, m._kernel_key = kern, keep, w, None


def compressed_linears(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def layer_paths(model: nn.Module) -> dict[str, str]:
    """The path each compressed linear ran in its last forward (``kernel:<name>/<dtype>`` or
    ``emulated``), by module name."""
    return {n: m.path for n, m in compressed_linears(model).items()}


def fallback_reasons(model: nn.Module) -> dict[str, int]:
    """How many compressed linears were emulated in their last forward for each reason, where a
    kernel of their format family exists on that device (``layer.fallback``): what a GPU run
    records beside ``linear_paths`` (``{"cuda-int4: needs sm80+, this GPU is sm75": 112}``)."""
    counts: Counter[str] = Counter()
    for m in compressed_linears(model).values():
        if m.path == "emulated" and m.fallback:
            counts[m.fallback] += 1
    return dict(counts)


def linear_paths(model: nn.Module, *, dense: bool = False) -> dict[str, int]:
    """How many linears ran through each path in their last forward: a compressed linear (any
    module with a ``path``) reports its own (``kernel:<name>/<dtype>`` or ``emulated``);
    ``dense=True`` also counts plain ``nn.Linear`` layers as ``dense`` (what a bench records)."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        path = getattr(m, "path", None)
        if isinstance(path, str):
            counts[path] += 1
        elif dense and isinstance(m, nn.Linear):
            counts["dense"] += 1
    return dict(counts)


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Allow or forbid real kernels on every compressed linear (emulated when forbidden)."""
    for m in compressed_linears(model).values():
        m.use_kernels = enabled
        m._kernel_key = None


def prepack(
    model: nn.Module, x_dtype: torch.dtype = torch.float32, *, decode_emulated: bool = False
) -> dict[str, int]:
    """Pack every compressed linear that has a kernel now (at load/convert time), as its first
    forward with ``x_dtype`` inputs would; returns how many layers took each path.

    ``decode_emulated``: a layer without a kernel decodes its weight once here and keeps the
    dense copy (as a dequantize-at-load runtime does), instead of decoding it at every forward.
    Its path stays ``emulated``: its speed is then the dense matmul's and its memory holds the
    packed weight plus the dense copy; without this, a timed forward would mostly time the
    format's decoder (for block formats such as nxfp4, ~10x the matmul).

    A kernel verdict probed on a busy machine is probed again here (at load time, before any
    timed run), not in the middle of a run."""
    reprobe_busy()
    for m in compressed_linears(model).values():
        dev = next(iter(m.buffers())).device
        x = torch.zeros(1, m.in_features, dtype=x_dtype, device=dev)
        with torch.no_grad():
            m(x)
            if decode_emulated and m.path == "emulated":
                m.cache_dequantized = True
                m.dequantize_weight()
    return linear_paths(model)
