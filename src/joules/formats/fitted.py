"""Fixed-parameter quantization for the group-wise formats: parameters per group, viewed per column.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("int4-g64")
    >>> w = torch.randn(16, 192)
    >>> f = fmt.fit(w)                                    # scales fixed: 16 rows x 3 groups
    >>> cols = [f.fake_quant_cols(w[:, c : c + 1], c) for c in range(192)]
    >>> torch.equal(torch.cat(cols, dim=1), fmt.fake_quant(w))
    True

A group-wise format (int, minifloat, nf4, mx, nxfp, ternary) subclasses :class:`GroupFormat`,
splits a tensor into groups with its :class:`~joules.formats.base.Grouping` and implements three
methods, which both :class:`GroupFormat`'s ``quantize``/``fake_quant`` and :class:`GroupFitted`
(its ``fit``) call, so the rounding logic exists once:

* ``_params(g)``: the parameters of each group of ``g`` [G, n] as [G, 1] tensors -- the stored
  ones under their part names (``scales``, ``offsets``...) plus any derived ones the rounding
  uses (an MX block's ``1 / X``);
* ``_values(x, p)``: ``x`` rounded to the format with parameters ``p`` broadcast against it,
  elementwise (so ``x`` may be groups [G, n] with [G, 1] parameters, or columns [rows, n] with
  [rows, 1] or [rows, n] parameters); fp32, ``x`` not modified;
* ``_pack(t, g, p)``: the packed :class:`~joules.formats.base.QuantizedTensor` of ``t`` whose
  groups are ``g``, with parameters ``p``.

:class:`GroupParams` keeps the [G, 1] parameters of a 2-D weight as [rows, groups per row]
grids (fp32, except int32/int64/bool ones such as table offsets) and precomputes, for every
group of columns, the [rows, 1] views a column of it uses, so
GPTQ's single-column call is a dict lookup plus the format's few elementwise ops.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from joules.formats.base import (
    Fitted,
    Format,
    Grouping,
    QuantizedTensor,
    check_fit_input,
    check_input,
)

# dtypes a parameter grid keeps (table offsets, masks); others become fp32 once, at fit
_KEEP = (torch.int32, torch.int64, torch.bool)


class GroupParams:
    """Per-group parameters ([G, 1] each) of a 2-D weight of ``shape``, viewed per column."""

    def __init__(self, grouping: Grouping, shape: tuple[int, int], params: dict[str, torch.Tensor]):
        rows, k = shape
        self.grouping = grouping
        self.shape = shape
        if grouping.kind == "tensor":
            grid_shape = (1, 1)
        elif grouping.kind == "channel":
            grid_shape = (rows, 1)
        else:
            grid_shape = (rows, -(-k // grouping.size))
        self.grid = {
            name: (p if p.dtype in _KEEP else p.float()).reshape(grid_shape)
            for name, p in params.items()
        }
        ngroups = grid_shape[1]
        # per group of columns: its [rows, 1] parameter views (the tensor/channel grid is one)
        self.views = [
            {name: p[:, j : j + 1] for name, p in self.grid.items()} for j in range(ngroups)
        ]
        self._col_group: torch.Tensor | None = None

    def cols(self, col0: int, n: int) -> dict[str, torch.Tensor]:
        """Parameters of columns col0 .. col0 + n - 1, broadcastable to [rows, n]."""
        if self.grouping.kind != "group":
            return self.views[0]
        size = self.grouping.size
        j0, j1 = col0 // size, (col0 + n - 1) // size
        if j0 == j1 or n == 0:
            return self.views[min(j0, len(self.views) - 1)]
        if self._col_group is None:
            dev = next(iter(self.grid.values())).device if self.grid else None
            self._col_group = torch.arange(self.shape[1], device=dev) // size
        idx = self._col_group[col0 : col0 + n]
        return {name: p.index_select(1, idx) for name, p in self.grid.items()}


class GroupFitted(Fitted):
    """A group-wise format's parameters fixed from a 2-D weight (``Format.fit``)."""

    def __init__(self, fmt: GroupFormat, w: torch.Tensor):
        check_fit_input(w, fmt.spec)
        super().__init__(fmt, (int(w.shape[0]), int(w.shape[1])))
        self._fmt = fmt
        self.params = fmt._params(fmt.grouping.split(w))
        self.columns = GroupParams(fmt.grouping, self.shape, self.params)

    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        self._check_cols(cols, col0)
        return self._fmt._values(cols.float(), self.columns.cols(col0, cols.shape[1]))

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        self._check_weight(w)
        return self._fmt._pack(w, self._fmt.grouping.split(w), self.params)


class GroupFormat(Format):
    """A group-wise format: ``fake_quant``, ``quantize`` and ``fit`` from its three methods."""

    grouping: Grouping

    @abstractmethod
    def _params(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters of each group of ``g`` [G, n] as [G, 1] tensors."""

    @abstractmethod
    def _values(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` rounded to the format with parameters ``p`` broadcast against it (fp32)."""

    @abstractmethod
    def _pack(
        self, t: torch.Tensor, g: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        """The packed tensor of ``t`` whose groups are ``g``, with parameters ``p``."""

    def fake_quant(self, t: torch.Tensor) -> torch.Tensor:
        check_input(t, self.spec)
        g = self.grouping.split(t)
        out = self._values(g, self._params(g))
        return self.grouping.merge(out, tuple(t.shape)).to(t.dtype)

    def quantize(self, t: torch.Tensor) -> QuantizedTensor:
        check_input(t, self.spec)
        g = self.grouping.split(t)
        return self._pack(t, g, self._params(g))

    def fit(self, w: torch.Tensor) -> GroupFitted:
        """Every per-group parameter (``_params``) fixed per tensor, row or group of ``w``."""
        return GroupFitted(self, w)
