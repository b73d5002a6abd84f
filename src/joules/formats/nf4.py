"""NF4: the 16 normal-quantile levels of QLoRA (Dettmers et al. 2023), absmax per block.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("nf4")                        # blocks of 64, fp32 absmax (bitsandbytes)
    >>> fmt.bits_per_element((4096, 4096))              # 4 + 32/64
    4.5
    >>> formats.get("nf4-g128-s16").bits_per_element((4096, 4096))
    4.125

Levels: :data:`NF4_LEVELS`, the table bitsandbytes ships (code 7 is exact zero, codes 0 and 15
are -1 and 1); :func:`normal_float_levels` rebuilds it from the normal quantiles (offset
0.9677, 8 positive and 7 negative quantiles plus zero, normalized to [-1, 1]) and a test checks
the two agree. Encoding: ``x / absmax`` goes to the nearest level; a value exactly midway
between two levels goes to the lower one. An all-zero block encodes to code 7.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    SCALE_BITS,
    FormatConfig,
    Grouping,
    Options,
    QuantizedTensor,
    check_qt,
    join_spec,
    register,
    register_format,
    safe_divisor,
    store_scale,
)
from joules.formats.fitted import GroupFormat
from joules.formats.packing import pack, unpack

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823029,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def normal_float_levels(offset: float = 0.9677083) -> list[float]:
    """QLoRA's construction of the NF4 levels from normal quantiles (float64)."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).tolist()


_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels [16], midpoints [15]) on ``device``."""
    key = str(device)
    if key not in _TABLES:
        lv = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
        _TABLES[key] = (lv, (lv[1:] + lv[:-1]) / 2)
    return _TABLES[key]


@dataclass(frozen=True)
class NF4Config(FormatConfig):
    family = "nf4"
    block_size: int = 64
    scale_dtype: str = "fp32"

    @property
    def spec(self) -> str:
        return join_spec(
            "nf4",
            "" if self.block_size == 64 else f"g{self.block_size}",
            ""
            if self.scale_dtype == "fp32"
            else {"fp16": "s16", "bf16": "sbf16"}[self.scale_dtype],
        )


@register(r"nf4", NF4Config, ["nf4"])
def _parse(m: re.Match[str], tokens: list[str]) -> NF4Config:
    o = Options("nf4", tokens, "g<N> (block size), s16/s32/sbf16")
    g = o.grouping(Grouping("group", 64))
    sd = o.scale_dtype("fp32")
    o.done()
    if g.kind != "group":
        raise ConfigError("nf4 uses absmax blocks along the last dim: use g<N>, not ch")
    return NF4Config(g.size, sd)


@register_format(NF4Config)
class NF4Format(GroupFormat):
    family = "nf4"

    def __init__(self, config: NF4Config, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.grouping = Grouping("group", config.block_size)

    @property
    def description(self) -> str:
        return f"QLoRA NormalFloat4 levels, {self.cfg.scale_dtype} absmax per block of {self.cfg.block_size}"

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        return {
            "codes": math.prod(shape) * 4,
            "scales": self.grouping.count(shape) * SCALE_BITS[self.cfg.scale_dtype],
        }

    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored absmax of each block of ``g`` ([G, n]) as [G, 1]."""
        s = store_scale(g.abs().amax(dim=1, keepdim=True), self.cfg.scale_dtype)
        return {"scales": s, "scale": s.float(), "div": safe_divisor(s.float())}

    def _codes(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.bucketize(x / p["div"], _tables(x.device)[1])

    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _tables(x.device)[0][self._codes(x, p)] * p["scale"]

    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        codes = self.grouping.strip_codes(self._codes(g, p), tuple(t.shape))
        return self._qt(t, {"codes": pack(codes, 4), "scales": p["scales"].reshape(-1)})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        codes = self.grouping.pad_codes(unpack(q.parts["codes"], 4, q.numel), q.shape)
        out = _tables(codes.device)[0][codes.long()] * q.parts["scales"].float().reshape(-1, 1)
        return self.grouping.merge(out, q.shape).to(q.dtype)
