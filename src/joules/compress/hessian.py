"""Hessians of layer inputs and the GPTQ column solver (also used by SparseGPT).

    >>> import torch
    >>> from joules import formats
    >>> from joules.compress.hessian import Hessian, gptq_quantize
    >>> x = torch.randn(512, 64); w = torch.randn(32, 64)
    >>> h = Hessian(64); h.add(x)
    >>> fitted = formats.get("int4-g32").fit(w)
    >>> q = gptq_quantize(w, h.matrix(), fitted.fake_quant_cols)
    >>> q.shape
    torch.Size([32, 64])

GPTQ (Frantar et al., 2023) rounds a weight one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs ``H = 2/n X^T X``, so the layer's output ``W X`` moves as little as possible. Lazy batch
updates (``block_size`` columns at a time) keep it fast. Rounding is delegated: ``round_col(col,
j)`` rounds column ``j`` (its original index) with parameters fixed beforehand (static groups),
so the values GPTQ produces are exactly what the format stores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from joules.errors import ConfigError

RoundFn = Callable[[torch.Tensor, int], torch.Tensor]  # (col [rows, 1], original index) -> col


class Hessian:
    """Running ``2/n X^T X`` over streamed inputs ``x`` of shape ``[tokens, cols]`` (fp64 sums)."""

    def __init__(self, cols: int) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``x`` ``[tokens, cols]``; ``xtx`` is its ``x^T x`` if known.

        Each batch's product runs in fp32 (fast kernels) and is summed in fp64 (exact enough
        over many batches)."""
        x = x.reshape(-1, x.shape[-1])
        if xtx is None:
            xtx = gram(x)
        self.sum.add_(xtx)
        self.n += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """``2/n X^T X`` in fp32."""
        if self.n == 0:
            raise ConfigError("no calibration tokens reached this layer: cannot build its Hessian")
        return (2.0 / self.n * self.sum).float()


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` of ``x`` ``[tokens, cols]`` in fp32, returned as fp64."""
    x = x.float()
    return (x.T @ x).double()


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising damping if needed."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    d = damp
    for _ in range(6):
        hd = h + d * max(mean_diag, 1e-8) * torch.eye(n, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd.double())
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            up, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info2) == 0:
                return up.float()
        d *= 10
    raise ConfigError(
        f"the layer's Hessian is not positive definite even with damp={d:g}: "
        "use more calibration tokens (--calib-n) or a larger damp"
    )


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    round_col: RoundFn,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ-round ``w`` ``[rows, cols]`` given input Hessian ``h`` ``[cols, cols]``.

    ``mask`` (bool ``[rows, cols]``, True = keep): pruned weights are forced to zero and their
    error is spread like a rounding error (SparseGPT's reconstruction with a fixed mask). Returns
    the rounded weight in fp32 (original column order).
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    _rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    order = perm.tolist() if perm is not None else list(range(cols))
    hinv = inverse_cholesky(h, damp)  # [cols, cols], upper
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]  # [rows, 1]
            if mask is not None:
                col = col * mask[:, i1 + i : i1 + i + 1]
            qc = round_col(col, order[i1 + i])
            if mask is not None:
                qc = qc * mask[:, i1 + i : i1 + i + 1]
            q[:, i1 + i : i1 + i + 1] = qc
            e = (w1[:, i : i + 1] - qc) / hinv1[i, i]
            w1[:, i:].sub_(e @ hinv1[i : i + 1, i:])
            err1[:, i : i + 1] = e
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q
