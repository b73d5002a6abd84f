"""Non-uniform per-channel codebooks (SqueezeLLM-style): ``codebook{2..4}``.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("codebook3")                   # 8 fp16 centroids per row
    >>> w = torch.randn(64, 512)
    >>> fmt.bits_per_element(tuple(w.shape))           # 3 + 8 * 16 / 512
    3.25
    >>> y = fmt.fake_quant(w)                           # every row uses at most 8 values
    >>> int(y[0].unique().numel()) <= 8
    True

Each row (output channel of a Linear weight; a 1-D tensor is one row) gets ``2**bits``
centroids from 1-D k-means (Lloyd), optionally weighted per element -- SqueezeLLM weights
by sensitivity (Fisher information); the compress step supplies such weights, here they default
to uniform. In one dimension a cluster is a run of the sorted row, so each Lloyd step costs only
``O(k log n)`` per row with prefix sums: rows are sorted once, clusters are found by binary search
of the centroid midpoints, and cluster means come from differences of cumulative sums (float64).
Initialization: the row's (j + 1/2)/k quantiles. Iteration stops when no centroid moves or after
``iterations`` (default 25, ``-it<N>``). Centroids are stored in fp16 (``-s32``/``-sbf16``) and
every element takes the nearest *stored* centroid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    SCALE_BITS,
    SCALE_DTYPES,
    Fitted,
    Format,
    FormatConfig,
    Options,
    QuantizedTensor,
    check_fit_input,
    check_input,
    check_qt,
    join_spec,
    register,
    register_format,
)
from joules.formats.packing import pack, unpack


def kmeans_1d(
    rows: torch.Tensor, k: int, weights: torch.Tensor | None = None, iterations: int = 25
) -> torch.Tensor:
    """Sorted centroids ``[R, k]`` of weighted 1-D k-means on each row of ``rows`` ``[R, n]``."""
    r, n = rows.shape
    xs, order = rows.float().sort(dim=1)
    w = (
        torch.ones_like(xs, dtype=torch.float64)
        if weights is None
        else weights.float().gather(1, order).double()
    )
    zero = xs.new_zeros(r, 1, dtype=torch.float64)
    cw = torch.cat([zero, w.cumsum(1)], dim=1)  # [R, n+1]
    cwx = torch.cat([zero, (w * xs.double()).cumsum(1)], dim=1)
    pos = ((torch.arange(k, device=rows.device) + 0.5) * n / k).long().clamp_(max=n - 1)
    c = xs[:, pos].double()  # [R, k]
    first = torch.zeros(r, 1, dtype=torch.long, device=rows.device)
    last = torch.full((r, 1), n, dtype=torch.long, device=rows.device)
    for _ in range(iterations):
        mids = ((c[:, 1:] + c[:, :-1]) / 2).float().contiguous()
        b = torch.cat([first, torch.searchsorted(xs, mids), last], dim=1)  # cluster bounds
        wsum = cw.gather(1, b[:, 1:]) - cw.gather(1, b[:, :-1])
        xsum = cwx.gather(1, b[:, 1:]) - cwx.gather(1, b[:, :-1])
        new = torch.where(wsum > 0, xsum / wsum.clamp(min=1e-300), c).sort(dim=1).values
        if torch.equal(new, c):
            break
        c = new
    return c.float()


@dataclass(frozen=True)
class CodebookConfig(FormatConfig):
    family = "codebook"
    bits: int = 4
    iterations: int = 25
    scale_dtype: str = "fp16"

    @property
    def spec(self) -> str:
        return join_spec(
            f"codebook{self.bits}",
            "" if self.iterations == 25 else f"it{self.iterations}",
            ""
            if self.scale_dtype == "fp16"
            else {"fp32": "s32", "bf16": "sbf16"}[self.scale_dtype],
        )


@register(r"codebook(\d+)", CodebookConfig, ["codebook4", "codebook3", "codebook2"])
def _parse(m: re.Match[str], tokens: list[str]) -> CodebookConfig:
    bits = int(m.group(1))
    if not 2 <= bits <= 4:
        raise ConfigError(
            f"codebook formats take 2..4 bits, got {bits}: use codebook2, codebook3 or codebook4"
        )
    o = Options(m.group(0), tokens, "it<N> (k-means iterations), s16/s32/sbf16")
    it = o.take(lambda t: int(t[2:]) if re.fullmatch(r"it\d+", t) else None)
    sd = o.scale_dtype("fp16")
    o.done()
    if it is not None and it < 1:
        raise ConfigError("k-means needs at least one iteration: use it1 or more")
    return CodebookConfig(bits, it or 25, sd)


@register_format(CodebookConfig)
class CodebookFormat(Format):
    family = "codebook"

    def __init__(self, config: CodebookConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.k = 1 << config.bits

    @property
    def description(self) -> str:
        return f"per-row {self.k}-entry {self.cfg.scale_dtype} codebook from 1-D k-means, {self.cfg.bits}-bit codes"

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(t.shape[0], -1) if t.dim() >= 2 else t.float().reshape(1, -1)

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        rows = shape[0] if len(shape) >= 2 else 1
        return {
            "codes": math.prod(shape) * self.cfg.bits,
            "codebooks": rows * self.k * SCALE_BITS[self.cfg.scale_dtype],
        }

    def _books(self, t: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The stored codebook of each row of ``t`` ([rows, k], sorted, in the scale dtype)."""
        rows = self._rows(t)
        if weights is not None:
            if weights.shape != t.shape:
                raise ConfigError(
                    f"weights shape {tuple(weights.shape)} must match the tensor's {tuple(t.shape)}"
                )
            weights = self._rows(weights)
        if rows.shape[1] == 0:
            return rows.new_zeros(rows.shape[0], self.k).to(SCALE_DTYPES[self.cfg.scale_dtype])
        rows_f = torch.nan_to_num(rows)  # k-means needs finite values; NaN/Inf rows are clamped
        c = kmeans_1d(rows_f, self.k, weights, self.cfg.iterations)
        return c.to(SCALE_DTYPES[self.cfg.scale_dtype])

    @staticmethod
    def _mids(books: torch.Tensor) -> torch.Tensor:
        """Midpoints between neighbouring stored centroids, fp32 [rows, k - 1]."""
        bf = books.float()
        return ((bf[:, 1:] + bf[:, :-1]) / 2).contiguous()

    @staticmethod
    def _assign(rows: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
        """Code of the nearest stored centroid of each element of ``rows`` [R, n] (NaN/Inf
        clamped as in k-means); ``mids`` is [R, k - 1]."""
        return torch.searchsorted(mids, torch.nan_to_num(rows.float()).contiguous())

    def _encode(
        self, t: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        books = self._books(t, weights)
        return self._assign(self._rows(t), self._mids(books)), books

    def fake_quant(self, t: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        check_input(t, self.spec)
        codes, books = self._encode(t, weights)
        return books.float().gather(1, codes).reshape(t.shape).to(t.dtype)

    def quantize(self, t: torch.Tensor, weights: torch.Tensor | None = None) -> QuantizedTensor:
        check_input(t, self.spec)
        codes, books = self._encode(t, weights)
        return self._qt(t, {"codes": pack(codes, self.cfg.bits), "codebooks": books.reshape(-1)})

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None = None) -> CodebookFitted:
        """Each row's codebook fixed from ``w`` (k-means weighted by ``weights`` if given);
        columns then round to the nearest entry of their row's codebook."""
        return CodebookFitted(self, w, weights)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_qt(q, self.spec)
        rows = q.shape[0] if len(q.shape) >= 2 else 1
        codes = unpack(q.parts["codes"], self.cfg.bits, q.numel).reshape(rows, -1).long()
        books = q.parts["codebooks"].float().reshape(rows, self.k)
        return books.gather(1, codes).reshape(q.shape).to(q.dtype)


class CodebookFitted(Fitted):
    """Per-row codebooks fixed from a 2-D weight (``CodebookFormat.fit``)."""

    def __init__(self, fmt: CodebookFormat, w: torch.Tensor, weights: torch.Tensor | None = None):
        check_fit_input(w, fmt.spec)
        super().__init__(fmt, (int(w.shape[0]), int(w.shape[1])))
        self._fmt = fmt
        self.books = fmt._books(w, weights)  # [rows, k], stored dtype
        self.books_f = self.books.float()
        self.mids = fmt._mids(self.books)

    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        self._check_cols(cols, col0)
        return self.books_f.gather(1, self._fmt._assign(cols, self.mids))

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        self._check_weight(w)
        codes = self._fmt._assign(w, self.mids)
        parts = {"codes": pack(codes, self._fmt.cfg.bits), "codebooks": self.books.reshape(-1)}
        return self._fmt._qt(w, parts)
