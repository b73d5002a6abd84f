"""Weight plans: how an earlier step asks the weight step (rtn, gptq) to round some weights apart.

    >>> import torch
    >>> from torch import nn
    >>> from joules.compress.solvers.plan import ColumnSplitPlan, fit_weight
    >>> lin = nn.Linear(128, 8)
    >>> lin.weight_plan = ColumnSplitPlan(64)      # the last 64 input columns stay in int8
    >>> f = fit_weight(lin, "int4-g64", lin.weight.detach())
    >>> q = f.fake_quant(lin.weight.detach())
    >>> f.quantize(q).spec, type(f.sparse_part(q)).__name__
    ('int4-g64', 'OutlierColumns')

A step that runs *before* the weight step (``act_quant`` with outlier channels, ``outliers``)
leaves a plan on the ``nn.Linear`` (attribute ``weight_plan``, not saved). ``fit_weight``
returns a :class:`~joules.formats.base.Fitted` whose ``fake_quant_cols`` rounds each column as
the plan says (GPTQ then spreads exactly that error), whose ``quantize(q)`` packs the dense part
in the step's format, and whose ``sparse_part(q)`` is the module that holds the rest
(``CompressedLinear.sparse``: ``add_to(w)`` and ``nbytes``, counted in bits/weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from joules import formats
from joules.compress.modules.linear import dtype_from_name, dtype_name, register_module
from joules.formats.base import Fitted, QuantizedTensor

OUTLIER_WEIGHT_FORMAT = "int8-ch"  # Atom keeps outlier channels' weight columns in 8 bit


def fit_weight(
    module: nn.Module, spec: str, w: torch.Tensor, imatrix: torch.Tensor | None = None
) -> Fitted:
    """``formats.get(spec).fit(w)``, or the module's plan's fit if it carries one. ``imatrix``
    (one importance per input column, for a format whose ``takes_imatrix``) weights its scale
    search; a plan's split fits its dense part unweighted."""
    plan = getattr(module, "weight_plan", None)
    if plan is not None:
        return plan.fit(formats.get(spec), w)
    if imatrix is not None:
        return formats.get(spec).fit(w, imatrix=imatrix)  # type: ignore[call-arg]
    return formats.get(spec).fit(w)


def sparse_part(fitted: Fitted, q: torch.Tensor) -> nn.Module | None:
    """The sparse/outlier module of a plan's fit (None for a plain fit)."""
    fn = getattr(fitted, "sparse_part", None)
    return fn(q) if fn is not None else None


# ----------------------------------------------------------------------------------------------
# Outlier columns (Atom): the last k input columns in 8 bit
# ----------------------------------------------------------------------------------------------


class _PackedPart(nn.Module):
    """A packed QuantizedTensor held as buffers ``q_<part>`` (saved with the state dict)."""

    def _set_qt(self, qt: QuantizedTensor) -> None:
        self.spec, self.shape, self.part_names = qt.spec, tuple(qt.shape), list(qt.parts)
        self.meta = dict(qt.meta)
        for n, v in qt.parts.items():
            self.register_buffer(f"q_{n}", v.clone())

    def qtensor(self) -> QuantizedTensor:
        parts = {n: getattr(self, f"q_{n}") for n in self.part_names}
        return QuantizedTensor(self.spec, self.shape, torch.float32, parts, self.meta)

    def _parts_config(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "shape": list(self.shape),
            "meta": self.meta,
            "parts": {
                n: [list(getattr(self, f"q_{n}").shape), dtype_name(getattr(self, f"q_{n}").dtype)]
                for n in self.part_names
            },
        }

    def _empty_from(self, cfg: dict[str, Any]) -> None:
        self.spec, self.shape = cfg["spec"], tuple(cfg["shape"])
        self.meta, self.part_names = dict(cfg.get("meta") or {}), list(cfg["parts"])
        for n, (s, d) in cfg["parts"].items():
            self.register_buffer(f"q_{n}", torch.empty(tuple(s), dtype=dtype_from_name(d)))

    @property
    def nbytes(self) -> int:
        return int(self.qtensor().nbytes)


@register_module("outlier_columns")
class OutlierColumns(_PackedPart):
    """Weight columns ``start..`` stored in their own (8-bit) format; ``add_to`` puts them in."""

    def __init__(self, qt: QuantizedTensor | None = None, start: int = 0) -> None:
        super().__init__()
        self.start = start
        if qt is not None:
            self._set_qt(qt)

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[:, self.start :] = formats.get(self.spec).dequantize(self.qtensor()).to(w.dtype)
        return w

    def export_config(self) -> dict[str, Any]:
        return {"start": self.start, **self._parts_config()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OutlierColumns:
        m = cls(None, int(cfg["start"]))
        m._empty_from(cfg)
        return m


class _SplitFitted(Fitted):
    """Columns < ``start`` rounded by ``low`` (the step's format), the rest by ``high``."""

    def __init__(self, low: Fitted, high: Fitted, start: int, shape: tuple[int, int]) -> None:
        super().__init__(low.format, shape)
        self.low, self.high, self.start = low, high, start

    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        n, b = cols.shape[1], self.start
        if col0 + n <= b:
            return self.low.fake_quant_cols(cols, col0)
        if col0 >= b:
            return self.high.fake_quant_cols(cols, col0 - b)
        cut = b - col0
        return torch.cat(
            [
                self.low.fake_quant_cols(cols[:, :cut], col0),
                self.high.fake_quant_cols(cols[:, cut:], 0),
            ],
            dim=1,
        )

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        w = w.clone()
        w[:, self.start :] = 0  # stored by the outlier part; whole zero groups in the dense part
        return self.low.quantize(w)

    def sparse_part(self, q: torch.Tensor) -> nn.Module:
        return OutlierColumns(self.high.quantize(q[:, self.start :].contiguous()), self.start)


class ColumnSplitPlan:
    """Keep the last ``k`` input columns in :data:`OUTLIER_WEIGHT_FORMAT` (Atom)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, fmt: formats.Format, w: torch.Tensor) -> Fitted:
        b = w.shape[1] - self.k
        dense = w.clone()
        dense[:, b:] = 0  # outliers out of the dense part's ranges
        low = fmt.fit(dense)
        high = formats.get(OUTLIER_WEIGHT_FORMAT).fit(w[:, b:].contiguous())
        return _SplitFitted(low, high, b, (int(w.shape[0]), int(w.shape[1])))
