"""Ternary weights (BitNet b1.58, Ma et al. 2024): absmean scale, values {-1, 0, +1} x scale.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("ternary")
    >>> fmt.fake_quant(torch.tensor([0.1, -2.0, 0.9, 1.0])).tolist()   # scale = mean|x| = 1.0
    [0.0, -1.0, 1.0, 1.0]
    >>> fmt.bits_per_element((4096, 4096))     # 5 trits per byte = 1.6 bits, + one fp32 scale
    1.6000022888183594

``scale = mean(|x|)`` over the tensor (or each ``-g<N>`` group / ``-ch`` row), ``q =
clamp(round(x / scale), -1, 1)`` (round half to even). Codes are packed five base-3 digits per
byte (3**5 = 243 <= 256, as llama.cpp's TQ1_0), so storage is 1.6 bits per weight, not 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from joules.formats.base import (
    SCALE_BITS,
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
from joules.formats.packing import pack_trits, trit_nbytes, unpack_trits


@dataclass(frozen=True)
class TernaryConfig(FormatConfig):
    family = "ternary"
    grouping: Grouping = field(default_factory=Grouping)
    scale_dtype: str = "fp32"

    @property
    def spec(self) -> str:
        return join_spec(
            "ternary", self.grouping.token, scale_token(self.scale_dtype, self.grouping)
        )


@register(r"ternary", TernaryConfig, ["ternary", "ternary-g64"])
def _parse(m: re.Match[str], tokens: list[str]) -> TernaryConfig:
    o = Options("ternary", tokens, "ch, g<N>, s16/s32/sbf16")
    g = o.grouping()
    sd = o.scale_dtype(default_scale_dtype(g))
    o.done()
    return TernaryConfig(g, sd)


@register_format(TernaryConfig)
class TernaryFormat(GroupFormat):
    family = "ternary"

    def __init__(self, config: TernaryConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = config.grouping

    @property
    def description(self) -> str:
        g = self.cfg.grouping
        return (
            f"BitNet b1.58 ternary {{-1,0,1}}, {self.cfg.scale_dtype} absmean scale per {g.kind}"
            + (f" of {g.size}" if g.kind == "group" else "")
        )

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        return {
            "codes": trit_nbytes(math.prod(shape)) * 8,  # whole bytes: 5 trits each
            "scales": self.cfg.grouping.count(shape) * SCALE_BITS[self.cfg.scale_dtype],
        }

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored absmean scale of each group of ``g`` ([G, n]) as [G, 1]."""
        s = store_scale(g.abs().mean(dim=1, keepdim=True), self.cfg.scale_dtype)
        return {"scales": s, "scale": s.float(), "div": safe_divisor(s.float())}

    def _trits(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """-1, 0, +1 as fp32 (-0 -> +0: code 1)."""
        return torch.round(x / p["div"]).clamp_(-1, 1).add_(0.0)

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._trits(x, p).mul_(p["scale"])

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        q = self._trits(g, p)
        codes = self.grouping.strip_codes((q + 1).to(torch.uint8), tuple(t.shape))
        return self._qt(t, {"codes": pack_trits(codes), "scales": p["scales"].reshape(-1)})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        codes = unpack_trits(q.parts["codes"], q.numel)
        g = self.cfg.grouping.pad_codes(codes, q.shape).float() - 1
        out = g * q.parts["scales"].float().reshape(-1, 1)
        return self.cfg.grouping.merge(out, q.shape).to(q.dtype)

    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        g = self.grouping.split(t)
        return self.grouping.merge((g / self._params(g)["div"]).abs() > 1.5, tuple(t.shape))
