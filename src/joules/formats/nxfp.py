"""NxFP, Nanoscaling Floating-Point (Lo, Wei & Brooks 2024, arXiv:2412.19821), on MX FP blocks.

    >>> import torch
    >>> from joules import formats
    >>> nx = formats.get("nxfp4")                        # NanoMantissa + AM + Code Recycling
    >>> nx.bits_per_element((4096, 4096))                # 4 + (8 + 2 + 2) / 32
    4.375
    >>> [formats.get(s).bits_per_element((4096, 4096)) for s in ("nxfp4-nm", "nxfp4-am", "nxfp4-cr")]
    [4.3125, 4.3125, 4.25]

The paper's three techniques, each a switch on top of the MX block (32 elements, shared E8M0
exponent), so their effects can be measured separately:

* **NanoMantissa** (``nm``, ``nm<k>``; default k = 2 bits): the shared scale gains k mantissa
  bits, ``s = 2**e * (1 + j / 2**k)``, stored as the E8M0 byte plus k bits per block. We pick the
  smallest such scale with ``amax / s <= max_elem``, so the block maximum lands within a factor
  ``1 + 2**-k`` below the element's largest value instead of anywhere in [max/1.5, 2*max) as with
  the power-of-two floor rule (which clips values above max). With ``nm`` off the scale is the
  plain OCP MX one.
* **Adaptive Microexponent** (``am``): each block picks, by least squared error, the element
  encoding with the best exponent/mantissa split for its distribution, signalled by a
  ``ceil(log2(candidates))``-bit block header. Candidates: 4-bit E2M1, E1M2 (0..3.5 step 0.5),
  E3M0 (0, 2**-2 .. 2**4); 6-bit E2M3, E3M2; 8-bit E4M3, E5M2. Each candidate gets its own
  scale by the active scale rule.
* **Code Recycling** (``cr``): the negative-zero code (sign bit alone, 0b1000 in FP4) decodes to
  an extra value: the midpoint of the two largest magnitudes of the element (+5 for E2M1, +3.25
  for E1M2, +12 for E3M0, +432 for E4M3, +53248 for E5M2), splitting the widest gap of the grid.
  Rounding goes to the nearest of the 16 values; a tie goes to the even code, then to the smaller.

Names: ``nxfp4`` = all three; ``nxfp4-nm``, ``nxfp4-am``, ``nxfp4-cr`` = each alone on ``mxfp4``;
tokens combine (``nxfp4-nm3-cr``); ``nxfp6-e2m3``/``nxfp8-e4m3`` start from those MX elements.

Interpretation: the paper's text was not available offline when this was written; the extra
scale bits (2), the candidate sets, the least-squared-error selection, the ceil scale rule under
NanoMantissa and the recycled value (gap midpoint, positive) are our reading of the technique
names and are stated here so results can be compared with the paper's once checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    FormatConfig,
    Grouping,
    Options,
    QuantizedTensor,
    check_input,
    check_qt,
    join_spec,
    register,
    register_format,
)
from joules.formats.fitted import GroupFormat
from joules.formats.minifloat import (
    ELEMENTS,
    Element,
    element_round,
    element_round_encode,
    exp2i,
    mixed_round,
    mixed_tables,
)
from joules.formats.mx import E8M0_BIAS, E8M0_NAN, e8m0_code, shared_exponent
from joules.formats.packing import pack, unpack

CANDIDATES = {4: ("e2m1", "e1m2", "e3m0"), 6: ("e2m3", "e3m2"), 8: ("e4m3", "e5m2")}
DEFAULT_NM_BITS = 2


@dataclass(frozen=True)
class NxFPConfig(FormatConfig):
    family = "nxfp"
    bits: int = 4
    element: str = "e2m1"
    nm_bits: int = DEFAULT_NM_BITS
    adaptive: bool = True
    recycle: bool = True
    block_size: int = 32

    @property
    def spec(self) -> str:
        head = f"nxfp{self.bits}" + ("" if self.bits == 4 else f"-{self.element}")
        every = self.nm_bits == DEFAULT_NM_BITS and self.adaptive and self.recycle
        opts = (
            []
            if every
            else [
                ""
                if self.nm_bits == 0
                else ("nm" if self.nm_bits == DEFAULT_NM_BITS else f"nm{self.nm_bits}"),
                "am" if self.adaptive else "",
                "cr" if self.recycle else "",
            ]
        )
        return join_spec(head, *opts, "" if self.block_size == 32 else f"g{self.block_size}")


@register(r"nxfp(\d+)", NxFPConfig, ["nxfp4", "nxfp4-nm", "nxfp4-am", "nxfp4-cr"])
def _parse(m: re.Match[str], tokens: list[str]) -> NxFPConfig:
    bits = int(m.group(1))
    if bits not in CANDIDATES:
        raise ConfigError(f"'nxfp{bits}': NxFP builds on MX FP elements: use nxfp4, nxfp6 or nxfp8")
    allowed = CANDIDATES[bits][:2] if bits != 4 else ("e2m1",)
    o = Options(f"nxfp{bits}", tokens, f"{'/'.join(allowed)}, nm, nm<k>, am, cr, g<N>")
    el = o.take(lambda t: t if t in allowed else None)
    if el is None:
        if bits != 4:
            raise ConfigError(
                f"nxfp{bits} needs an element: nxfp{bits}-{allowed[0]} or nxfp{bits}-{allowed[1]}"
            )
        el = "e2m1"
    nm = o.take(
        lambda t: (int(t[2:]) if t[2:] else DEFAULT_NM_BITS) if re.fullmatch(r"nm\d*", t) else None
    )
    am, cr = o.flag("am"), o.flag("cr")
    g = o.grouping(Grouping("group", 32))
    o.done()
    if g.kind != "group":
        raise ConfigError("NxFP scales blocks along the last dim: use g<N>, not ch")
    if nm is not None and not 1 <= nm <= 8:
        raise ConfigError(f"NanoMantissa takes 1..8 extra scale bits, got nm{nm}")
    if nm is None and not am and not cr:
        nm, am, cr = DEFAULT_NM_BITS, True, True  # bare nxfp<b>: every technique
    return NxFPConfig(bits, el, nm or 0, am, cr, g.size)


class _Candidate:
    """One element encoding of a block: its 2**bits code values and how to round to them."""

    def __init__(self, el: Element, recycle: bool):
        self.el = el
        self.recycle = recycle
        vals = [el.decode_code(c) for c in range(1 << el.bits)]
        self.neg_zero = 1 << (el.bits - 1)
        if recycle:
            finite = sorted({(abs(v), c) for c, v in enumerate(vals) if math.isfinite(v) and v > 0})
            (p, p_code), (q, _) = finite[-2], finite[-1]
            self.recycled = (p + q) / 2
            vals[self.neg_zero] = self.recycled
            # v rounds to the recycled value on (lo, hi]; at lo it ties with p: even code first
            # (the recycled code is even), then the smaller value.
            self.lo, self.hi = (p + self.recycled) / 2, (self.recycled + q) / 2
            self.lo_inclusive = p_code % 2 == 1
        self.values = vals
        self.max_value = max(v for v in vals if math.isfinite(v))
        self._luts: dict[str, torch.Tensor] = {}

    def lut(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._luts:
            self._luts[key] = torch.tensor(self.values, dtype=torch.float32, device=device)
        return self._luts[key]

    def round(
        self, v: torch.Tensor, codes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rounded values, codes if asked) of scaled elements ``v`` (not modified)."""
        if not self.recycle:
            return element_round_encode(self.el, v) if codes else (element_round(self.el, v), None)
        if codes:
            r, code = element_round_encode(self.el, v)
        else:
            r, code = element_round(self.el, v), None
        above = v >= self.lo if self.lo_inclusive else v > self.lo
        mask = above.logical_and_(v <= self.hi)
        r = r.add_(0.0).masked_fill_(mask, self.recycled)  # -0 -> +0: -0's code is taken
        if code is not None:
            code = code.masked_fill_(code == self.neg_zero, 0).masked_fill_(mask, self.neg_zero)
        return r, code


@register_format(NxFPConfig)
class NxFPFormat(GroupFormat):
    # fit (GroupFormat's) fixes per block the element encoding (adaptive microexponent), the
    # E8M0 exponent and the nano-mantissa; code recycling applies to every column as in quantize.
    family = "nxfp"

    def __init__(self, config: NxFPConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = Grouping("group", config.block_size)
        names = CANDIDATES[config.bits] if config.adaptive else (config.element,)
        if config.adaptive and config.bits != 4:  # the chosen element first
            names = (config.element, *[n for n in names if n != config.element])
        self.cands = [_Candidate(ELEMENTS[n], config.recycle) for n in names]
        self.sel_bits = math.ceil(math.log2(len(self.cands))) if len(self.cands) > 1 else 0
        self.elem_bits = ELEMENTS[config.element].bits
        self._mixed_cache: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def description(self) -> str:
        c = self.cfg
        parts = [
            f"NanoMantissa {c.nm_bits} bits" if c.nm_bits else "",
            f"adaptive microexponent over {'/'.join(x.el.name.upper() for x in self.cands)}"
            if c.adaptive
            else "",
            "code recycling (-0 -> extra value)" if c.recycle else "",
        ]
        return f"NxFP{c.bits} on MX blocks of {c.block_size}: " + ", ".join(p for p in parts if p)

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        nb = self.grouping.count(shape)
        bits = {"codes": math.prod(shape) * self.elem_bits, "scales": nb * 8}
        if self.cfg.nm_bits:
            bits["nano_mantissa"] = nb * self.cfg.nm_bits
        if self.sel_bits:
            bits["selector"] = nb * self.sel_bits
        return bits

    # -- scale ---------------------------------------------------------------------------------
    def _scale(self, amax: torch.Tensor, cand: _Candidate) -> tuple[torch.Tensor, torch.Tensor]:
        """(E8M0 code uint8 [G,1], nano-mantissa j int32 [G,1]) of each block for ``cand``."""
        m = self.cfg.nm_bits
        if m == 0:
            return e8m0_code(shared_exponent(amax, cand.el.emax)), torch.zeros_like(
                amax, dtype=torch.int32
            )
        r = amax / cand.max_value
        e = ((r.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2 r), r normal
        frac = r * exp2i((-e).clamp(-149, 127))  # in [1, 2)
        j = torch.ceil((frac - 1) * (1 << m)).to(torch.int32)
        carry = j >= (1 << m)
        e = torch.where(carry, e + 1, e)
        j = torch.where(carry, torch.zeros_like(j), j)
        low = e <= -E8M0_BIAS  # zero or fp32-subnormal ratio: the smallest scale
        e = torch.where(low, torch.full_like(e, -E8M0_BIAS), e).clamp_(max=E8M0_BIAS)
        j = torch.where(low, torch.zeros_like(j), j)
        code = torch.where(torch.isfinite(amax), e + E8M0_BIAS, torch.full_like(e, E8M0_NAN))
        return code.to(torch.uint8), j

    def _scale_value(self, code: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        c = code.to(torch.int32)
        s = exp2i(c.clamp(max=254) - E8M0_BIAS) * (1 + j.float() / (1 << self.cfg.nm_bits))
        return torch.where(c == E8M0_NAN, torch.full_like(s, float("nan")), s)

    # -- encode --------------------------------------------------------------------------------
    @staticmethod
    def _divisor(s: torch.Tensor) -> torch.Tensor:
        """What a block is divided by: its scale, or 1 for a NaN scale (which decodes to NaN)."""
        return torch.where(torch.isnan(s), torch.ones_like(s), s)

    def _cand_round(
        self, cand: _Candidate, g: torch.Tensor, s: torch.Tensor, want_codes: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(values, codes if asked, scaled v) of ``g`` rounded by ``cand`` with scales ``s``."""
        v = g / self._divisor(s)
        r, codes = cand.round(v, want_codes)
        return r.mul_(s), codes, v

    def _encode(
        self, t: torch.Tensor, want_codes: bool, want_v: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Per block: every candidate's scale and rounded values, then (AM) the least-squared-
        error candidate. Returned tensors are [G, n] (values, codes, scaled v) or [G, 1]."""
        return self._select(self.grouping.split(t), want_codes, want_v)

    def _select(
        self, g: torch.Tensor, want_codes: bool, want_v: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """:meth:`_encode` on blocks ``g`` [G, n]."""
        lo, hi = torch.aminmax(g, dim=1, keepdim=True)
        amax = torch.maximum(hi, lo.neg_())
        per = []
        for cand in self.cands:
            code, j = self._scale(amax, cand)
            s = self._scale_value(code, j)
            r, codes, v = self._cand_round(cand, g, s, want_codes)
            per.append(
                {"code": code, "j": j, "s": s, "val": r, "codes": codes, "v": v if want_v else None}
            )
        if len(per) == 1:
            out = per[0]
            out["sel"] = torch.zeros_like(out["code"])
            return out
        sse = torch.cat(
            [torch.sub(p["val"], g).square_().sum(dim=1, keepdim=True) for p in per], dim=1
        )
        sel = torch.argmin(
            torch.nan_to_num(sse, nan=0.0), dim=1, keepdim=True
        )  # [G, 1]; first on ties
        out = dict(per[0])
        for i, p in enumerate(per[1:], start=1):
            pick = sel == i
            for k in ("code", "j", "s", "val", "codes", "v"):
                if out[k] is not None:
                    out[k] = torch.where(pick, p[k], out[k])
        out["sel"] = sel.to(torch.uint8)
        return out

    def _round_fixed(
        self, x: torch.Tensor, p: dict[str, torch.Tensor], want_codes: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, codes if asked) of ``x`` with each block's chosen candidate
        ``p["selector"]``, its scale ``p["s"]`` and divisor ``p["div"]`` fixed (broadcast
        against ``x``): as :meth:`_cand_round` of the chosen candidate, the division and the
        scaling done once for all candidates."""
        v = x / p["div"]
        r, codes = self.cands[0].round(v, want_codes)
        for i, cand in enumerate(self.cands[1:], start=1):
            pick = p["selector"] == i
            if not bool(pick.any()):
                continue
            ri, ci = cand.round(v, want_codes)
            r = torch.where(pick, ri, r)
            if codes is not None and ci is not None:
                codes = torch.where(pick, ci, codes)
        return r.mul_(p["s"]), codes

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per block of ``g`` ([G, n]), as [G, 1]: the chosen candidate (``selector``), its
        E8M0 byte (``scales``), nano-mantissa (``nano_mantissa``), scale value ``s`` and the
        divisor ``div`` (``s``, 1 for a NaN block)."""
        e = self._select(g, want_codes=False)
        s, sel = e["s"], e["sel"]
        assert s is not None and sel is not None and e["code"] is not None and e["j"] is not None
        tabs = self._mixed(g.device)
        i = sel.long()
        p = {
            "scales": e["code"],
            "nano_mantissa": e["j"],
            "selector": sel,
            "s": s,
            "div": self._divisor(s),
            "offset": sel.to(torch.int32) * 256,  # into the stacked element tables
            "maxn": tabs["maxn"][i],
        }
        if self.cfg.recycle:
            p.update({k: tabs[k][i] for k in ("lo", "hi", "rec")})
        return p

    def _mixed(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-candidate constants of the one-pass rounding (:func:`mixed_round`) on
        ``device``: stacked element tables, max normals and the recycling interval
        [lo, hi] -> rec, with an exclusive lower end moved to the next float up."""
        key = str(device)
        if key not in self._mixed_cache:
            inv, step, maxn = mixed_tables([c.el for c in self.cands], device)
            t = {"inv": inv, "step": step, "maxn": maxn}
            if self.cfg.recycle:
                lo = torch.tensor([c.lo for c in self.cands], device=device)
                up = torch.nextafter(lo, torch.full_like(lo, math.inf))
                excl = torch.tensor([not c.lo_inclusive for c in self.cands], device=device)
                t["lo"] = torch.where(excl, up, lo)
                t["hi"] = torch.tensor([c.hi for c in self.cands], device=device)
                t["rec"] = torch.tensor([c.recycled for c in self.cands], device=device)
            self._mixed_cache[key] = t
        return self._mixed_cache[key]

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """One pass for every block whatever its element (the fixed-parameter column path):
        :meth:`_Candidate.round` of each row's chosen candidate, then its scale."""
        tabs = self._mixed(x.device)
        v = x / p["div"]
        r = mixed_round(v, tabs["inv"], tabs["step"], p["maxn"], p["offset"])
        if self.cfg.recycle:  # as _Candidate.round: -0 -> +0, (lo, hi] -> the recycled value
            mask = (v >= p["lo"]).logical_and_(v <= p["hi"])
            r = torch.where(mask, p["rec"], r.add_(0.0))
        return r.mul_(p["s"])

    def _parts(
        self, t: torch.Tensor, codes: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        codes = self.grouping.strip_codes(codes, tuple(t.shape))
        parts = {"codes": pack(codes, self.elem_bits), "scales": p["scales"].reshape(-1)}
        if self.cfg.nm_bits:
            parts["nano_mantissa"] = pack(p["nano_mantissa"].reshape(-1), self.cfg.nm_bits)
        if self.sel_bits:
            parts["selector"] = pack(p["selector"].reshape(-1), self.sel_bits)
        return self._qt(t, parts)

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        codes = self._round_fixed(g, p, want_codes=True)[1]
        assert codes is not None
        return self._parts(t, codes, p)

    def fake_quant(self, t: torch.Tensor) -> torch.Tensor:
        check_input(t, self.spec)
        out = self._encode(t, want_codes=False)["val"]
        return self.grouping.merge(out, tuple(t.shape)).to(t.dtype)

    def quantize(self, t: torch.Tensor) -> QuantizedTensor:
        check_input(t, self.spec)
        e = self._encode(t, want_codes=True)
        p = {"scales": e["code"], "nano_mantissa": e["j"], "selector": e["sel"]}
        return self._parts(t, e["codes"], p)  # type: ignore[arg-type]

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        nb = self.grouping.count(q.shape)
        codes = self.grouping.pad_codes(
            unpack(q.parts["codes"], self.elem_bits, q.numel), q.shape
        ).long()
        code = q.parts["scales"].reshape(-1, 1)
        j = (
            unpack(q.parts["nano_mantissa"], self.cfg.nm_bits, nb)
            if self.cfg.nm_bits
            else torch.zeros_like(code)
        )
        sel = (
            unpack(q.parts["selector"], self.sel_bits, nb)
            if self.sel_bits
            else torch.zeros_like(code)
        )
        luts = torch.stack([c.lut(codes.device) for c in self.cands])  # [C, 2**bits]
        vals = luts.reshape(-1)[sel.reshape(-1, 1).long() * luts.shape[1] + codes]
        out = vals * self._scale_value(code, j.reshape(-1, 1).to(torch.int32))
        return self.grouping.merge(out, q.shape).to(q.dtype)

    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        e = self._encode(t, want_codes=False, want_v=True)
        maxv = torch.tensor([c.max_value for c in self.cands], device=t.device)[e["sel"].long()]
        return self.grouping.merge(e["v"].abs() > maxv, tuple(t.shape))
