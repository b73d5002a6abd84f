"""OCP minifloats: FP8 (E4M3, E5M2), FP6 (E2M3, E3M2), FP4 (E2M1), with a scale per tensor,
channel or group, or none (``-raw``).

    >>> import torch
    >>> from joules import formats
    >>> formats.get("fp4-e2m1-raw").fake_quant(torch.tensor([0.3, 2.5, 5.1, 100.0])).tolist()
    [0.5, 2.0, 6.0, 6.0]
    >>> formats.get("fp8-e4m3-g32").bits_per_element((4096, 4096))   # 8 + 16/32
    8.5

Element semantics (OCP 8-bit FP spec v1.0 and OCP MX spec v1.0): value
``(-1)**s * 2**(e - bias) * 1.m`` for ``e > 0`` and ``(-1)**s * 2**(1 - bias) * 0.m`` for
``e == 0``. E4M3 has no infinities and one NaN mantissa pattern (S.1111.111), max 448; E5M2
is IEEE-like (S.11111.00 = Inf, S.11111.xx = NaN), max 57344; FP6 and FP4 have neither Inf nor
NaN. Two extra 4-bit elements serve NxFP's adaptive microexponent: E1M2 (bias 0: 0..3.5 in
steps of 0.5) and E3M0 (bias 3: 0, 0.25, 0.5 ... 16).

Conversion: round to nearest, ties to even mantissa (E3M0 has no mantissa: ties go to the
larger power of two), then saturate to the largest normal. Non-finite inputs: with a scale, a
group holding NaN or Inf gets a NaN scale and decodes to NaN (as OCP MX's NaN scale). Raw
(unscaled) casts: NaN stays NaN where the element has a NaN code and becomes 0 where it has none
(FP6/FP4: the OCP spec leaves this to the implementation); +-Inf saturates to +-max except in
E5M2, which keeps its infinities. torch 2.13's own casts agree bit for bit over the finite range
(tests check a dense grid); beyond it float8_e4m3fn saturates as we do (Inf too), while
float8_e5m2 turns finite values >= 61440 into Inf where we saturate to 57344.

Scaled conversion: ``scale = amax(group) / max_normal`` stored as fp32 per tensor and fp16 per
channel/group (``-s16``/``-s32``/``-sbf16`` override), elements = round(x / scale).
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
    check_input,
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


def exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exact 2**e as fp32 for integer e in [-149, 127] (subnormal powers included)."""
    e = e.to(torch.int32)
    normal = ((e.clamp(min=-126) + 127) << 23).view(torch.float32)
    sub = (torch.ones_like(e) << (e.clamp(-149, -127) + 149)).view(torch.float32)
    return torch.where(e >= -126, normal, sub)


@dataclass(frozen=True)
class Element:
    """A sign + ``ebits`` exponent + ``mbits`` mantissa floating-point element."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    has_inf: bool = False
    has_nan: bool = False
    torch_dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (and the subnormal binade)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal (the OCP MX ``emax_elem``)."""
        return math.floor(math.log2(self.max_normal))

    @property
    def nan_code(self) -> int:
        return (1 << (self.ebits + self.mbits)) - 1  # S.1..1.1..1 (E4M3 and E5M2)

    def decode_code(self, code: int) -> float:
        """The value of one code, straight from the spec formula (used to build the LUT)."""
        s = -1.0 if code >> (self.ebits + self.mbits) else 1.0
        e = (code >> self.mbits) & ((1 << self.ebits) - 1)
        m = code & ((1 << self.mbits) - 1)
        if self.has_inf and e == (1 << self.ebits) - 1:
            return s * math.inf if m == 0 else math.nan
        if self.has_nan and not self.has_inf and (code & self.nan_code) == self.nan_code:
            return math.nan
        if e == 0:
            return s * 2.0 ** (1 - self.bias) * (m / 2**self.mbits)
        return s * 2.0 ** (e - self.bias) * (1 + m / 2**self.mbits)

    def lut(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """fp32 value of every code, indexed by code."""
        key = (self.name, str(device))
        if key not in _LUTS:
            vals = [self.decode_code(c) for c in range(1 << self.bits)]
            _LUTS[key] = torch.tensor(vals, dtype=torch.float32, device=device)
        return _LUTS[key]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per fp32 exponent field (0..255): 2**(M - e), 2**(e - M) and the code of the
        binade's first value, e = max(field - 127, emin) -- so rounding needs no per-element
        exponent arithmetic, only a table lookup."""
        key = (self.name + "#tab", str(device))
        if key not in _LUTS:
            f = torch.arange(256, dtype=torch.int32)
            e = (f - 127).clamp(min=self.emin, max=self.emax + 1)
            inv = exp2i(self.mbits - e)
            step = exp2i(e - self.mbits)
            base = ((e - self.emin) << self.mbits).float()
            _LUTS[key] = torch.stack([inv, step, base]).to(device)
        t = _LUTS[key]
        return t[0], t[1], t[2]

    def round_encode(
        self, v: torch.Tensor, codes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Round fp32 ``v`` to this element's values (RNE, saturating; NaN stays NaN) and, if
        asked, give the codes (uint8; NaN's code is left to the caller).

        With ``e = max(floor(log2|v|), emin)`` and ``n = round(|v| * 2**(M - e))`` the value is
        ``n * 2**(e - M)`` and the magnitude code is ``(e - emin) * 2**M + n`` (n = 2**(M+1)
        carries into the next binade, which that formula also gets right). In-place ops on one
        buffer: fresh 64 MB temporaries cost more than the arithmetic on 2 cores.
        """
        inv_t, step_t, base_t = self._tables(v.device)
        e, n, buf = _round_magnitude(v, inv_t, self.max_normal)
        code = None
        if codes:
            code = torch.index_select(base_t, 0, e).view_as(n).add_(n)
            code.add_(torch.signbit(v), alpha=float(1 << (self.ebits + self.mbits)))
            code = code.to(torch.uint8)
        return _round_finish(v, e, n, buf, step_t), code

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Round fp32 ``v`` to this element's values (RNE, saturating); NaN stays NaN."""
        return self.round_encode(v)[0]

    def encode(self, r: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of already-rounded fp32 values ``r`` (finite, |r| <= max, or NaN)."""
        bits = r.view(torch.int32)
        sign = (bits >> 31) & 1
        a = r.abs()
        ab = a.view(torch.int32)
        efield = ((ab >> 23) - 127 + self.bias).clamp_(min=0)
        mant = (ab >> (23 - self.mbits)) & ((1 << self.mbits) - 1)
        sub = torch.round(a * 2.0 ** (self.mbits - self.emin)).to(torch.int32)
        normal = a >= 2.0**self.emin
        mag = torch.where(normal, (efield << self.mbits) | mant, sub)
        code = (sign << (self.ebits + self.mbits)) | mag
        nan = torch.isnan(r)
        if self.has_nan or self.has_inf:
            code = torch.where(nan, (sign << (self.ebits + self.mbits)) | self.nan_code, code)
            if self.has_inf:
                inf_code = ((1 << self.ebits) - 1) << self.mbits
                code = torch.where(
                    torch.isinf(r), (sign << (self.ebits + self.mbits)) | inf_code, code
                )
        else:
            code = torch.where(nan, torch.zeros_like(code), code)
        return code.to(torch.uint8)

    def cast(self, v: torch.Tensor) -> torch.Tensor:
        """Raw cast of fp32 ``v`` to element values (no scale), as fp32."""
        r = self.round(v)
        if self.has_inf:  # E5M2 keeps its infinities
            r = torch.where(torch.isinf(v), v, r)
        if not self.has_nan and not self.has_inf:
            r = torch.nan_to_num(r, nan=0.0)
        return r


def _round_magnitude(
    v: torch.Tensor,
    inv_t: torch.Tensor,
    max_normal: float | torch.Tensor,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of :meth:`Element.round_encode`: (table index e, n = round(|v| * inv_t[e]),
    a buffer shaped like v). ``max_normal`` and ``offset`` (added to the fp32 exponent field)
    may be per-row tensors: :func:`mixed_round` rounds each row to its own element."""
    a = v.abs()
    if isinstance(max_normal, torch.Tensor):
        # a tensor bound turns NaN into the default (negative) NaN: mask the sign off
        e = (torch.minimum(a, max_normal, out=a).view(torch.int32) >> 23).bitwise_and_(0xFF)
    else:
        e = a.clamp_(max=max_normal).view(torch.int32) >> 23
    if offset is not None:
        e = e.add_(offset)
    e = e.view(-1)
    buf = torch.index_select(inv_t, 0, e).view_as(a)
    return e, a.mul_(buf).round_(), buf


def _round_finish(
    v: torch.Tensor, e: torch.Tensor, n: torch.Tensor, buf: torch.Tensor, step_t: torch.Tensor
) -> torch.Tensor:
    """Second half: the value n * step_t[e] with v's sign (overwrites n and buf)."""
    torch.index_select(step_t, 0, e, out=buf.view(-1))
    return n.mul_(buf).copysign_(v)


def mixed_tables(
    elements: list[Element], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inv, step, max_normal) of several elements stacked: element i's table starts at
    i * 256, so ``mixed_round`` with offset ``i * 256`` rounds to element i."""
    tabs = [el._tables(device) for el in elements]
    inv = torch.cat([t[0] for t in tabs])
    step = torch.cat([t[1] for t in tabs])
    maxn = torch.tensor([el.max_normal for el in elements], device=device)
    return inv, step, maxn


def mixed_round(
    v: torch.Tensor,
    inv_t: torch.Tensor,
    step_t: torch.Tensor,
    max_normal: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """:meth:`Element.round` with the element chosen per row (tables from
    :func:`mixed_tables`, ``max_normal``/``offset`` [rows, 1] of the chosen element), bit for
    bit what each row's own element gives, in one pass."""
    e, n, buf = _round_magnitude(v, inv_t, max_normal, offset)
    return _round_finish(v, e, n, buf, step_t)


_LUTS: dict[tuple[str, str], torch.Tensor] = {}

ELEMENTS: dict[str, Element] = {
    "e4m3": Element("e4m3", 4, 3, 7, 448.0, has_nan=True, torch_dtype=torch.float8_e4m3fn),
    "e5m2": Element(
        "e5m2", 5, 2, 15, 57344.0, has_inf=True, has_nan=True, torch_dtype=torch.float8_e5m2
    ),
    "e2m3": Element("e2m3", 2, 3, 1, 7.5),
    "e3m2": Element("e3m2", 3, 2, 3, 28.0),
    "e2m1": Element("e2m1", 2, 1, 1, 6.0),
    "e1m2": Element("e1m2", 1, 2, 0, 3.5),
    "e3m0": Element("e3m0", 3, 0, 3, 16.0),
}
_WIDTH = {"e4m3": 8, "e5m2": 8, "e2m3": 6, "e3m2": 6, "e2m1": 4}


def element_round(el: Element, v: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Fast element rounding: torch's native float8 cast for E4M3/E5M2 (bit-identical to
    :meth:`Element.round`, as tests check), the arithmetic path otherwise. ``v`` is finite
    or NaN (``inplace``: it may be overwritten); the result is -0.0 for small negatives, as
    the code table has -0."""
    if el.torch_dtype is not None:
        c = (
            v.clamp_(-el.max_normal, el.max_normal)
            if inplace
            else v.clamp(-el.max_normal, el.max_normal)
        )
        return c.to(el.torch_dtype).float()
    return el.round(v)


def element_codes(el: Element, v: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Codes (uint8) of fp32 ``v``, without materializing the rounded values where avoidable."""
    if el.torch_dtype is not None:
        c = (
            v.clamp_(-el.max_normal, el.max_normal)
            if inplace
            else v.clamp(-el.max_normal, el.max_normal)
        )
        return c.to(el.torch_dtype).view(torch.uint8)
    code = el.round_encode(v, codes=True)[1]
    assert code is not None
    return code


def element_round_encode(el: Element, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes) of fp32 ``v`` (finite or NaN) for the quantize path."""
    if el.torch_dtype is not None:
        f8 = v.clamp(-el.max_normal, el.max_normal).to(el.torch_dtype)
        return f8.float(), f8.view(torch.uint8)
    r, code = el.round_encode(v, codes=True)
    assert code is not None
    return r, code


def element_encode(el: Element, r: torch.Tensor) -> torch.Tensor:
    """Codes of already-rounded values ``r``."""
    if el.torch_dtype is not None:
        return r.to(el.torch_dtype).view(torch.uint8)
    return el.encode(r)


@dataclass(frozen=True)
class MinifloatConfig(FormatConfig):
    family = "minifloat"
    element: str = "e4m3"
    grouping: Grouping = field(default_factory=Grouping)
    scale_dtype: str = "fp32"
    raw: bool = False  # no scale: a plain cast

    @property
    def spec(self) -> str:
        w = _WIDTH[self.element]
        if self.raw:
            return f"fp{w}-{self.element}-raw"
        return join_spec(
            f"fp{w}",
            self.element,
            self.grouping.token,
            scale_token(self.scale_dtype, self.grouping),
        )


@register(
    r"fp(8|6|4)",
    MinifloatConfig,
    ["fp8-e4m3", "fp8-e5m2", "fp6-e2m3", "fp6-e3m2", "fp4-e2m1", "fp4-e2m1-g32"],
)
def _parse(m: re.Match[str], tokens: list[str]) -> MinifloatConfig:
    width = int(m.group(1))
    allowed = [k for k, w in _WIDTH.items() if w == width]
    o = Options(f"fp{width}", tokens, f"{'/'.join(allowed)}, raw, ch, g<N>, s16/s32/sbf16")
    el = o.take(lambda t: t if t in allowed else None)
    if el is None:
        if width == 4:
            el = "e2m1"
        else:
            raise ConfigError(
                f"fp{width} needs an element: fp{width}-{allowed[0]} or fp{width}-{allowed[1]}"
            )
    raw = o.flag("raw")
    g = o.grouping()
    sd = o.scale_dtype(default_scale_dtype(g))
    o.done()
    if raw and (g.kind != "tensor"):
        raise ConfigError("'raw' means no scale at all: drop the ch/g<N> option or drop raw")
    return MinifloatConfig(el, g, sd, raw)


@register_format(MinifloatConfig)
class MinifloatFormat(GroupFormat):
    family = "minifloat"

    def __init__(self, config: MinifloatConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = config.grouping
        self.el = ELEMENTS[config.element]

    @property
    def description(self) -> str:
        c, el = self.cfg, self.el
        where = (
            "no scale"
            if c.raw
            else f"{c.scale_dtype} absmax scale per {c.grouping.kind}"
            + (f" of {c.grouping.size}" if c.grouping.kind == "group" else "")
        )
        return (
            f"OCP FP{el.bits} {el.name.upper()} (max {el.max_normal:g}), RNE + saturation, {where}"
        )

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        n = math.prod(shape)
        bits = {"codes": n * self.el.bits}
        if not self.cfg.raw:
            bits["scales"] = self.grouping.count(shape) * SCALE_BITS[self.cfg.scale_dtype]
        return bits

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored absmax scale of each group of ``g`` ([G, n]) as [G, 1]; none if raw."""
        if self.cfg.raw:
            return {}
        amax = g.abs().amax(dim=1, keepdim=True)
        s = store_scale(amax / self.el.max_normal, self.cfg.scale_dtype)
        return {"scales": s, "scale": s.float(), "div": safe_divisor(s.float())}

    def _scaled(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Groups divided by their stored scale, and the stored scale: ([G, n], [G, 1])."""
        g = self.grouping.split(t)
        p = self._params(g)
        return g / p["div"], p["scales"]

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.raw:
            return self._raw_cast(x)
        return element_round(self.el, x / p["div"], inplace=True).mul_(p["scale"])

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        if self.cfg.raw:
            x = t.float()
            if self.el.torch_dtype is not None:
                codes = self._raw_fp8(x).view(torch.uint8)
            else:
                codes = self.el.encode(self.el.cast(x))
            return self._qt(t, {"codes": pack(codes, self.el.bits)})
        codes = element_codes(self.el, g / p["div"], inplace=True)
        codes = self.grouping.strip_codes(codes, tuple(t.shape))
        return self._qt(t, {"codes": pack(codes, self.el.bits), "scales": p["scales"].reshape(-1)})

    def fake_quant(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cfg.raw:
            return super().fake_quant(t)
        check_input(t, self.spec)
        return self._raw_cast(t.float()).to(t.dtype)

    def quantize(self, t: torch.Tensor) -> QuantizedTensor:
        if not self.cfg.raw:
            return super().quantize(t)
        check_input(t, self.spec)
        return self._pack(t, t, {})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        codes = unpack(q.parts["codes"], self.el.bits, q.numel)
        if self.cfg.raw:
            return self.el.lut(codes.device)[codes.long()].reshape(q.shape).to(q.dtype)
        g = self.grouping.pad_codes(codes, q.shape)
        vals = self.el.lut(codes.device)[g.long()] * q.parts["scales"].float().reshape(-1, 1)
        return self.grouping.merge(vals, q.shape).to(q.dtype)

    def _raw_fp8(self, x: torch.Tensor) -> torch.Tensor:
        """torch's native cast with our saturation: finite overflow and (E4M3) Inf -> +-max;
        E5M2 keeps Inf; NaN stays NaN."""
        m = self.el.max_normal
        c = x.clamp(-m, m)
        if self.el.has_inf:
            c = torch.where(torch.isinf(x), x, c)
        return c.to(self.el.torch_dtype)  # type: ignore[arg-type]

    def _raw_cast(self, x: torch.Tensor) -> torch.Tensor:
        if self.el.torch_dtype is not None:
            return self._raw_fp8(x).float()
        return self.el.cast(x)

    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.raw:
            return t.float().abs() > self.el.max_normal
        v, _ = self._scaled(t)
        return self.grouping.merge(v.abs() > self.el.max_normal, tuple(t.shape))

    def error_model(self, t: torch.Tensor) -> BlockModel | None:
        if self.cfg.raw or self.grouping.kind == "tensor":
            return None
        v, s = self._scaled(t)
        return float_block_model(self.el, v, s.float())


def float_block_model(el: Element, v: torch.Tensor, scale: torch.Tensor) -> BlockModel:
    """Error model of a block of scaled FP elements ``v`` ([G, n]) with scales ([G, 1]).

    Guaranteed bound: an in-range element's error is at most half the step of the top binade,
    ``2**(emax - M - 1) * scale``; model MSE: sum of (local step)**2 / 12, the local step being
    ``2**(max(floor(log2|v|), emin) - M) * scale`` (Widrow's uniform-noise model).
    """
    fin = torch.isfinite(v).all(dim=1, keepdim=True) & torch.isfinite(scale)
    sc = torch.where(fin, scale, torch.zeros_like(scale))
    a = torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v)).clamp(max=el.max_normal)
    e = ((a.view(torch.int32) >> 23) - 127).clamp(min=el.emin)
    step = exp2i(e - el.mbits) * sc
    bound = float((2.0 ** (el.emax - el.mbits - 1)) * sc.max()) if sc.numel() else 0.0
    return BlockModel(bound, float((step.double() ** 2).sum() / 12 / max(v.numel(), 1)))
