"""Integer formats: symmetric ``int{2..8}`` and asymmetric ``uint{2..8}-asym``, with one scale
per tensor, per channel (``-ch``: per row, i.e. per output channel of a Linear weight) or per
group along the last dimension (``-g32``, ``-g64``, ``-g128``...).

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("uint4-asym-g32")                  # GGUF Q4_1-style
    >>> fmt.bits_per_element((4096, 4096))                  # 4 + (16 + 16) / 32
    5.0
    >>> q = fmt.quantize(torch.randn(64, 64)); q.nbytes
    2560

Symmetric: ``q = clamp(round(x / s), -(2**(b-1) - 1), 2**(b-1) - 1)`` with
``s = amax / (2**(b-1) - 1)``: the restricted range (int4 in [-7, 7], int8 in [-127, 127])
keeps the grid symmetric so that ``-x`` quantizes to ``-q``. Codes are stored offset by
``2**(b-1) - 1`` as unsigned b-bit fields.

Asymmetric (min/max rounding, as GGUF Q4_1): ``s = (max - min) / (2**b - 1)``, the group
minimum ``m`` is stored in the scale dtype, ``q = clamp(round((x - m) / s), 0, 2**b - 1)`` and
``x' = q * s + m``. ``-zpint`` stores an integer zero-point ``z = round(-min / s)`` in b bits
instead (``x' = (q - z) * s``, exact zero, coarser offset).

Rounding is round-half-to-even (``torch.round``). Scales: fp32 per tensor, fp16 per
channel/group (``-s16``/``-s32``/``-sbf16`` override); a zero scale (constant group) encodes
every element as the group's offset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    SCALE_BITS,
    BlockModel,
    FormatConfig,
    Grouping,
    Options,
    QuantizedTensor,
    check_qt,
    default_scale_dtype,
    join_spec,
    register,
    register_format,
    safe_divisor,
    scale_token,
    store_scale,
)
from joules.formats.fitted import GroupFormat
from joules.formats.packing import pack, unpack


@dataclass(frozen=True)
class IntConfig(FormatConfig):
    family = "int"
    bits: int = 8
    symmetric: bool = True
    grouping: Grouping = field(default_factory=Grouping)
    scale_dtype: str = "fp32"
    int_zero_point: bool = False

    @property
    def spec(self) -> str:
        head = f"int{self.bits}" if self.symmetric else f"uint{self.bits}-asym"
        return join_spec(
            head,
            self.grouping.token,
            scale_token(self.scale_dtype, self.grouping),
            "zpint" if self.int_zero_point else "",
        )


@register(
    r"(u?)int(\d+)",
    IntConfig,
    [
        "int8",
        "int8-ch",
        "int4-ch",
        "int4-g128",
        "int4-g32",
        "uint4-asym-g32",
        "uint4-asym-g128",
        "int3-g64",
        "int2-g64",
    ],
)
def _parse(m: re.Match[str], tokens: list[str]) -> IntConfig:
    unsigned, bits = m.group(1) == "u", int(m.group(2))
    if not 2 <= bits <= 8:
        raise ConfigError(
            f"integer formats take 2..8 bits, got {bits}: use e.g. int4, int8, uint4-asym"
        )
    o = Options(m.group(0), tokens, "asym (uint), ch, g<N>, s16/s32/sbf16, zpint")
    asym = o.flag("asym")
    if asym and not unsigned:
        raise ConfigError(
            f"'int{bits}-asym': asymmetric formats are unsigned, write 'uint{bits}-asym'"
        )
    g = o.grouping()
    sd = o.scale_dtype(default_scale_dtype(g))
    zpint = o.flag("zpint")
    o.done()
    if zpint and not unsigned:
        raise ConfigError("'zpint' is an option of uint<b>-asym formats only")
    return IntConfig(bits, not unsigned, g, sd, zpint)


@register_format(IntConfig)
class IntFormat(GroupFormat):
    family = "int"

    def __init__(self, config: IntConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = config.grouping
        self.qmax = (1 << (config.bits - 1)) - 1 if config.symmetric else (1 << config.bits) - 1

    @property
    def description(self) -> str:
        c = self.cfg
        g = c.grouping.kind + (f" of {c.grouping.size}" if c.grouping.kind == "group" else "")
        if c.symmetric:
            return f"{c.bits}-bit symmetric int in [-{self.qmax}, {self.qmax}], {c.scale_dtype} scale per {g}"
        off = f"{c.bits}-bit int zero-point" if c.int_zero_point else f"{c.scale_dtype} minimum"
        return f"{c.bits}-bit unsigned [0, {self.qmax}] with {off}, {c.scale_dtype} scale per {g}"

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        c = self.cfg
        ng = c.grouping.count(shape)
        bits = {"codes": math.prod(shape) * c.bits, "scales": ng * SCALE_BITS[c.scale_dtype]}
        if not c.symmetric:
            bits["offsets"] = ng * (c.bits if c.int_zero_point else SCALE_BITS[c.scale_dtype])
        return bits

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored parameters of each group of ``g`` ([G, n]) as [G, 1] tensors."""
        c = self.cfg
        if c.symmetric:
            amax = g.abs().amax(dim=1, keepdim=True)
            s = store_scale(amax / self.qmax, c.scale_dtype)
            return {"scales": s, "div": safe_divisor(s.float())}
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        s = store_scale((hi - lo) / self.qmax, c.scale_dtype)
        div = safe_divisor(s.float())
        if c.int_zero_point:
            z = torch.round(-lo / div).clamp_(0, self.qmax)
            return {"scales": s, "offsets": z.to(torch.uint8), "div": div}
        return {"scales": s, "offsets": store_scale(lo, c.scale_dtype), "div": div}

    def _codes(self, g: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unsigned integer codes as fp32 [G, n] (exact small integers)."""
        c = self.cfg
        div = p["div"]
        if c.symmetric:
            return torch.round(g / div).clamp_(-self.qmax, self.qmax).add_(self.qmax)
        if c.int_zero_point:
            return torch.round(g / div).add_(p["offsets"].float()).clamp_(0, self.qmax)
        q = torch.round((g - p["offsets"].float()) / div).clamp_(0, self.qmax)
        return q.add_(0.0)  # -0 -> +0, as the stored code decodes

    def _decode(self, q: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        s = p["scales"].float()
        if c.symmetric:
            return (q - self.qmax) * s
        if c.int_zero_point:
            return (q - p["offsets"].float()) * s
        return q * s + p["offsets"].float()

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._decode(self._codes(x, p), p)

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        codes = self.grouping.strip_codes(self._codes(g, p).to(torch.uint8), tuple(t.shape))
        parts = {"codes": pack(codes, self.cfg.bits), "scales": p["scales"].reshape(-1)}
        if "offsets" in p:
            off = p["offsets"].reshape(-1)
            parts["offsets"] = pack(off, self.cfg.bits) if self.cfg.int_zero_point else off
        return self._qt(t, parts)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        c = self.cfg
        codes = unpack(q.parts["codes"], c.bits, q.numel)
        g = c.grouping.pad_codes(codes, q.shape).float()
        ng = c.grouping.count(q.shape)
        p = {"scales": q.parts["scales"].reshape(-1, 1)}
        if "offsets" in q.parts:
            off = q.parts["offsets"]
            p["offsets"] = (unpack(off, c.bits, ng) if c.int_zero_point else off).reshape(-1, 1)
        return c.grouping.merge(self._decode(g, p), q.shape).to(q.dtype)

    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        g = c.grouping.split(t)
        p = self._params(g)
        div = p["div"]
        if c.symmetric:
            out = (g / div).abs() > self.qmax + 0.5
        else:
            if c.int_zero_point:
                u = g / div + p["offsets"].float()
            else:
                u = (g - p["offsets"].float()) / div
            out = (u < -0.5) | (u > self.qmax + 0.5)
        return c.grouping.merge(out, tuple(t.shape))

    def error_model(self, t: torch.Tensor) -> BlockModel | None:
        """Uniform grid: every in-range error <= step/2; model MSE = mean(step**2) / 12."""
        if self.cfg.grouping.kind == "tensor":
            return None
        g = self.cfg.grouping.split(t)
        s = self._params(g)["scales"].float()
        s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        return BlockModel(float(s.max()) / 2, float((s.double() ** 2).mean() / 12))
