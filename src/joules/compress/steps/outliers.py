"""``outliers(fraction=0.005, criterion=magnitude)``: dense-and-sparse weights (SqueezeLLM).

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress
    >>> model, tok, _ = tiny_model()
    >>> cm = compress(model, "outliers(fraction=0.01) | rtn(format=int3-g32)")
    >>> lin = model.model.layers[0].mlp.down_proj
    >>> type(lin.sparse).__name__, lin.sparse.nnz == round(0.01 * 128 * 64)
    ('SparseOutliers', True)

The selected weights of each target linear are kept in fp16 in a CSR matrix (int32 row
pointers, int16/int32 column indices, fp16 values: about 32 bits per kept weight plus 32 per
row), counted in the layer's bits/weight; the following weight step (``rtn`` or ``gptq``)
quantizes the rest with those weights *out of its ranges* (they are zero in the dense part, so
scales and codebooks fit the bulk), and GPTQ treats them as exact (no rounding error to
spread). ``criterion=magnitude`` keeps the largest ``|w|``; ``criterion=sensitivity`` keeps the
largest ``s * w^2`` with ``s`` the diagonal sensitivity (``sensitivity=hessian``: the input
Hessian diagonal ``2/n sum x_j^2`` per column; ``fisher``: the mean squared gradient of the
calibration loss per weight). With ``criterion=sensitivity`` and a ``codebook`` format the
k-means is weighted by ``s`` as SqueezeLLM does (``fraction=0`` gives the weighted codebook
alone). Put it before the weight step; one sparse part per layer (not with ``act_quant``'s
outlier channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from joules import formats
from joules.compress.context import BlockInputs, CompressContext, dense_weight
from joules.compress.modules.linear import (
    CompressedLinear,
    dtype_from_name,
    dtype_name,
    register_module,
)
from joules.compress.recipe import Step, register_step
from joules.errors import ConfigError
from joules.formats.base import Fitted, QuantizedTensor

# ----------------------------------------------------------------------------------------------
# The sparse part
# ----------------------------------------------------------------------------------------------


@register_module("sparse_outliers")
class SparseOutliers(nn.Module):
    """A CSR matrix of fp16 weights that ``add_to(w)`` writes over the decoded dense weight."""

    def __init__(self, rows: int, cols: int, nnz: int, index_dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.register_buffer("crow", torch.zeros(rows + 1, dtype=torch.int32))
        self.register_buffer("col", torch.zeros(nnz, dtype=index_dtype))
        self.register_buffer("values", torch.zeros(nnz, dtype=torch.float16))

    @classmethod
    def from_mask(cls, w: torch.Tensor, mask: torch.Tensor) -> SparseOutliers:
        rows, cols = w.shape
        idx_dtype = torch.int16 if cols <= 32767 else torch.int32
        r, c = mask.nonzero(as_tuple=True)  # row-major order
        m = cls(rows, cols, int(r.numel()), idx_dtype)
        counts = torch.bincount(r, minlength=rows)
        m.crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        m.col.copy_(c.to(idx_dtype))
        m.values.copy_(w[r, c].to(torch.float16))
        return m

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.crow, self.col, self.values))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        counts = (self.crow[1:] - self.crow[:-1]).long()
        r = torch.repeat_interleave(torch.arange(self.rows, device=w.device), counts)
        w = w.clone()
        w[r, self.col.long()] = self.values.to(w.dtype)
        return w

    def export_config(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cols": self.cols,
            "nnz": self.nnz,
            "index_dtype": dtype_name(self.col.dtype),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SparseOutliers:
        return cls(cfg["rows"], cfg["cols"], cfg["nnz"], dtype_from_name(cfg["index_dtype"]))


class _SparseFitted(Fitted):
    """The step's format fitted on the dense part; kept positions stay fp16 (exact)."""

    def __init__(self, dense: Fitted, mask: torch.Tensor) -> None:
        super().__init__(dense.format, dense.shape)
        self.dense, self.mask = dense, mask

    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        q = self.dense.fake_quant_cols(cols, col0)
        m = self.mask[:, col0 : col0 + cols.shape[1]]
        return torch.where(m, cols.float().half().float(), q)

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        return self.dense.quantize(torch.where(self.mask, torch.zeros_like(w), w))

    def sparse_part(self, q: torch.Tensor) -> nn.Module | None:
        return SparseOutliers.from_mask(q, self.mask) if bool(self.mask.any()) else None


class SparsePlan:
    """Weight plan: ``mask`` positions go to the sparse part; ``sensitivity`` weights k-means."""

    def __init__(self, mask: torch.Tensor, sensitivity: torch.Tensor | None = None) -> None:
        self.mask, self.sensitivity = mask, sensitivity

    def fit(self, fmt: formats.Format, w: torch.Tensor) -> Fitted:
        dense = torch.where(self.mask, torch.zeros_like(w), w)
        if self.sensitivity is not None and fmt.family == "codebook":
            weights = torch.where(self.mask, torch.zeros_like(w), self.sensitivity)
            fitted = fmt.fit(dense, weights=weights)  # type: ignore[call-arg]
        else:
            fitted = fmt.fit(dense)
        return _SparseFitted(fitted, self.mask)


def select_outliers(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``round(fraction * numel)`` largest scores (ties: lowest index)."""
    n = round(fraction * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if n > 0:
        mask[torch.topk(score.reshape(-1).float(), n, sorted=False).indices] = True
    return mask.reshape(score.shape)


# ----------------------------------------------------------------------------------------------
# Sensitivities
# ----------------------------------------------------------------------------------------------


def hessian_diagonals(
    ctx: CompressContext, targets: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """``2/n sum_t x_tj^2`` per input column of each target (calibration inputs, in order)."""
    by_block = ctx.by_block(
        targets, "outliers(criterion=sensitivity) targets block linears, not '{name}'"
    )
    out: dict[str, torch.Tensor] = {}

    def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
        mods = by_block[i]
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in inputs.batches(block, mods):
            for rel, x in batch.items():
                s = x.double().pow(2).sum(0)
                sums[rel] = sums[rel] + s if rel in sums else s
            n += next(iter(batch.values())).shape[0]
        for rel, s in sums.items():
            out[f"{block_name}.{rel}"] = (2.0 / max(n, 1) * s).float()

    ctx.sequential(fn, step="outliers", blocks=set(by_block))
    return out


def fisher_diagonals(
    ctx: CompressContext, targets: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of each target weight: the mean over calibration *sequences* of
    the squared gradient of that sequence's LM loss (as SqueezeLLM; the square of a batch-mean
    gradient would cancel most of it and leave a handful of noisy samples)."""
    calib = ctx.require_calibration("outliers")
    params = [p for p in ctx.model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in targets.items()}
    for m in targets.values():
        m.weight.requires_grad_(True)
    try:
        for i in range(len(calib)):
            ids = calib[i : i + 1]
            loss = ctx.model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, [m.weight for m in targets.values()])
            for n, g in zip(targets, grads, strict=True):
                acc[n] += g.float().pow(2)
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
    return {n: a / max(len(calib), 1) for n, a in acc.items()}


@register_step("outliers")
@dataclass(kw_only=True)
class Outliers(Step):
    """Keep ``fraction`` of each target's weights in fp16 (sparse); the next step does the rest."""

    fraction: float = 0.005
    criterion: Literal["magnitude", "sensitivity"] = "magnitude"
    sensitivity: Literal["hessian", "fisher"] = "hessian"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.criterion == "sensitivity"

    def validate(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(
                f"outliers fraction={self.fraction}: use a value in [0, 1), e.g. 0.005 (0.5 %)"
            )

    def apply(self, ctx: CompressContext) -> None:
        targets = ctx.resolve_targets(self.targets)
        for name, m in targets.items():
            if isinstance(m, CompressedLinear):
                raise ConfigError(
                    f"outliers: '{name}' is already quantized; put outliers before the weight "
                    "step (e.g. outliers(fraction=0.005) | gptq(format=int4-g64))"
                )
            if getattr(m, "weight_plan", None) is not None:
                raise ConfigError(
                    f"outliers: '{name}' already keeps part of its weight apart (act_quant "
                    "outlier_channels): use one of the two per layer"
                )
        sens: dict[str, torch.Tensor] = {}
        if self.criterion == "sensitivity":
            if self.sensitivity == "hessian":
                diag = hessian_diagonals(ctx, targets)
                sens = {n: diag[n][None, :].expand(m.out_features, -1) for n, m in targets.items()}
            else:
                sens = fisher_diagonals(ctx, targets)
        for name, m in targets.items():
            w = dense_weight(m)
            s = sens.get(name)
            score = w.abs() if s is None else s * w.pow(2)
            mask = select_outliers(score, self.fraction)
            m.weight_plan = SparsePlan(mask, s.contiguous() if s is not None else None)
            ctx.record(
                name,
                outlier_fraction=self.fraction,
                outlier_criterion=self.criterion
                + (f"/{self.sensitivity}" if s is not None else ""),
            )
