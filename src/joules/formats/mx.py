"""OCP Microscaling (MX v1.0): blocks of 32 elements sharing one E8M0 power-of-two scale.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("mxfp4")
    >>> fmt.bits_per_element((4096, 4096))                 # 4 + 8/32
    4.25
    >>> x = torch.tensor([[7.0] + [1.0] * 31])            # amax 7: X = 2**(2 - 2) = 1
    >>> fmt.fake_quant(x)[0, :2].tolist()                 # 7 saturates to 6
    [6.0, 1.0]

Formats: ``mxfp8-e4m3``, ``mxfp8-e5m2``, ``mxfp6-e2m3``, ``mxfp6-e3m2``, ``mxfp4`` (E2M1) and
``mxint8``; ``-g<N>`` changes the block size (the spec fixes 32). Blocks run along the last
dimension (the input dimension of a Linear weight); a short last block is padded internally.

Scale (spec section 6.3): ``X = 2**(floor(log2(amax)) - emax_elem)`` with the exponent clamped to
E8M0's [-127, 127]; an all-zero block gets X = 2**-127; a block holding NaN or Inf gets the NaN
scale 0xFF and decodes to NaN. Elements ``round(x / X)`` with round-to-nearest-even and
saturation to the element's largest normal (values in [max, 2**(emax+1)) are clipped -- the
known cost of the spec's floor rule). MXINT8 elements are two's-complement int8 with an implicit
2**-6 (values q/64), clamped to [-127, 127] so the grid stays symmetric.

Agreement with ``torchao.prototype.mx_formats.mx_tensor.to_mx`` (FLOOR mode): identical scales
and element codes for blocks with amax >= 2**(emax_elem - 126); torchao divides blocks below that
by 2**-126 while storing 2**-127 (and so decodes them at half their value), and maps an
Inf block to a finite scale, where we store NaN. torchao has no MXINT8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    BlockModel,
    FormatConfig,
    Grouping,
    Options,
    QuantizedTensor,
    check_qt,
    join_spec,
    register,
    register_format,
)
from joules.formats.fitted import GroupFormat
from joules.formats.minifloat import (
    ELEMENTS,
    Element,
    element_codes,
    element_round,
    float_block_model,
)
from joules.formats.packing import pack, unpack

E8M0_BIAS = 127
E8M0_NAN = 255


def shared_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """Unbiased shared exponent (fp32, [-127, 127], NaN for a NaN/Inf block) of each block:
    ``floor(log2(amax)) - emax_elem`` (OCP MX section 6.3). log2 runs in float64, where it is
    exact enough that floor never rounds across a power of two for fp32 inputs; per-block ops
    are few and in float because each op has a fixed cost that dominates on small tensors."""
    x = torch.log2(amax.double()).floor_().sub_(emax_elem).clamp_(-E8M0_BIAS, E8M0_BIAS)
    return x.add_(amax - amax).float()  # amax - amax is NaN exactly for NaN/Inf blocks


def e8m0_code(x: torch.Tensor) -> torch.Tensor:
    """E8M0 byte of unbiased exponents ``x`` (NaN -> 0xFF)."""
    return (x + E8M0_BIAS).nan_to_num_(E8M0_NAN).to(torch.uint8)


def e8m0_value(code: torch.Tensor) -> torch.Tensor:
    """fp32 value 2**(code - 127) of E8M0 codes; NaN for 0xFF (exp2 is exact on integers)."""
    v = torch.exp2(code.float() - E8M0_BIAS)
    return torch.where(code == E8M0_NAN, torch.full_like(v, float("nan")), v)


@dataclass(frozen=True)
class MXConfig(FormatConfig):
    family = "mx"
    element: str = "e2m1"  # e4m3 e5m2 e2m3 e3m2 e2m1 int8
    block_size: int = 32

    @property
    def spec(self) -> str:
        head = {"e2m1": "mxfp4", "int8": "mxint8"}.get(self.element)
        if head is None:
            head = f"mxfp{ELEMENTS[self.element].bits}-{self.element}"
        return join_spec(head, "" if self.block_size == 32 else f"g{self.block_size}")


_MX_ELEMENTS = {8: ("e4m3", "e5m2"), 6: ("e2m3", "e3m2"), 4: ("e2m1",)}


@register(
    r"mx(fp|int)(\d+)",
    MXConfig,
    ["mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp4", "mxint8"],
)
def _parse(m: re.Match[str], tokens: list[str]) -> MXConfig:
    kind, width = m.group(1), int(m.group(2))
    if kind == "int":
        if width != 8:
            raise ConfigError(f"'mxint{width}': OCP MX defines mxint8 only")
        el = "int8"
        o = Options("mxint8", tokens, "g<N> (block size)")
    else:
        if width not in _MX_ELEMENTS:
            raise ConfigError(f"'mxfp{width}': OCP MX defines mxfp8, mxfp6 and mxfp4")
        allowed = _MX_ELEMENTS[width]
        o = Options(f"mxfp{width}", tokens, f"{'/'.join(allowed)}, g<N> (block size)")
        el = o.take(lambda t: t if t in allowed else None)
        if el is None:
            if len(allowed) > 1:
                raise ConfigError(
                    f"mxfp{width} needs an element: mxfp{width}-{allowed[0]} or mxfp{width}-{allowed[1]}"
                )
            el = allowed[0]
    g = o.grouping(Grouping("group", 32))
    o.done()
    if g.kind != "group":
        raise ConfigError("MX formats scale blocks along the last dim: use g<N>, not ch")
    return MXConfig(el, g.size)


@register_format(MXConfig)
class MXFormat(GroupFormat):
    family = "mx"

    def __init__(self, config: MXConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = Grouping("group", config.block_size)
        self.el: Element | None = ELEMENTS.get(config.element)
        self.elem_bits = 8 if self.el is None else self.el.bits
        self.emax = 0 if self.el is None else self.el.emax

    @property
    def description(self) -> str:
        what = "INT8 (q/64)" if self.el is None else f"FP{self.el.bits} {self.el.name.upper()}"
        return f"OCP MX: {what} elements, E8M0 shared scale per block of {self.cfg.block_size}"

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        return {
            "codes": math.prod(shape) * self.elem_bits,
            "scales": self.grouping.count(shape) * 8,
        }

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per block of ``g`` ([G, n]), as [G, 1]: the E8M0 byte (``scales``), the unbiased
        exponent ``x``, ``inv`` = 1 / X (1 for a NaN block) and ``scale`` = X."""
        lo, hi = torch.aminmax(g, dim=1, keepdim=True)  # one pass, no |g| temporary
        x = shared_exponent(torch.maximum(hi, lo.neg_()), self.emax)
        return {
            "scales": e8m0_code(x),
            "x": x,
            "inv": torch.exp2(-x).nan_to_num_(1.0),
            "scale": torch.exp2(x),
        }

    def _blocks(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled elements v = x / X ([G, n]) and the unbiased shared exponents ([G, 1])."""
        g = self.grouping.split(t)
        p = self._params(g)
        return g * p["inv"], p["x"]

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        """Element values of scaled ``v`` (which this may overwrite)."""
        if self.el is None:  # MXINT8: q/64 with q in [-127, 127]
            return (
                torch.round(v.mul_(64.0)).clamp_(-127, 127).add_(0.0).mul_(1 / 64)
            )  # +0, as code 0
        return element_round(self.el, v, inplace=True)

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._round(x * p["inv"]).mul_(p["scale"])

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        v = g * p["inv"]
        if self.el is None:
            codes = (self._round(v) * 64).to(torch.int8).view(torch.uint8)
        else:
            codes = element_codes(self.el, v, inplace=True)
        codes = self.grouping.strip_codes(codes, tuple(t.shape))
        scales = p["scales"].reshape(-1).to(torch.uint8)
        return self._qt(t, {"codes": pack(codes, self.elem_bits), "scales": scales})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        codes = self.grouping.pad_codes(unpack(q.parts["codes"], self.elem_bits, q.numel), q.shape)
        if self.el is None:
            vals = codes.view(torch.int8).float() * (1 / 64)
        else:
            vals = self.el.lut(codes.device)[codes.long()]
        out = vals * e8m0_value(q.parts["scales"].reshape(-1, 1))
        return self.grouping.merge(out, q.shape).to(q.dtype)

    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        v, _ = self._blocks(t)
        over = (v * 64).abs() > 127.5 if self.el is None else v.abs() > self.el.max_normal
        return self.grouping.merge(over, tuple(t.shape))

    def error_model(self, t: torch.Tensor) -> BlockModel:
        v, x = self._blocks(t)
        scale = torch.exp2(x)
        if self.el is not None:
            return float_block_model(self.el, v, scale)
        # MXINT8 is block floating point: one step 2**-6 * X for the whole block.
        s = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale)) / 64
        return BlockModel(float(s.max()) / 2, float((s.double() ** 2).mean() / 12))
