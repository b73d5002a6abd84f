"""Hessians of layer inputs and the GPTQ column solver (also used by SparseGPT).

    >>> import torch
    >>> from joules import formats
    >>> from joules.compress.solvers.hessian import Hessian, gptq_quantize
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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from joules.errors import ConfigError

RoundFn = Callable[[torch.Tensor, int], torch.Tensor]  # (col [rows, 1], original index) -> col


class Hessian:
    """Running ``2/n X^T X`` over streamed inputs ``x`` of shape ``[tokens, cols]`` (fp64 sums)."""

    def __init__(self, cols: int, device: str | torch.device | None = None) -> None:
        # on the device of the inputs it sums (a GPU's compression keeps its Hessians there)
        self.sum: torch.Tensor | None = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.n = 0
        self._factors: dict[tuple[float, bool, int], Factor] = {}
        self._diag: torch.Tensor | None = None  # kept when the sum is released by factor()

    def _require_sum(self) -> torch.Tensor:
        if self.n == 0:
            raise ConfigError("no calibration tokens reached this layer: cannot build its Hessian")
        if self.sum is None:
            raise ValueError("this Hessian's sum was released by factor(release=True)")
        return self.sum

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``x`` ``[tokens, cols]``; ``xtx`` is its ``x^T x`` if known.

        Each batch's product runs in fp32 (fast kernels) and is summed in fp64 (exact enough
        over many batches)."""
        x = x.reshape(-1, x.shape[-1])
        if xtx is None:
            xtx = gram(x)
        if self.sum is None:
            raise ValueError("this Hessian's sum was released by factor(release=True)")
        if self.n == 0 and self.sum.device != xtx.device:  # still zeros: follow the inputs
            self.sum = self.sum.to(xtx.device)  # (a GPU's compression sums on the GPU)
        self.sum.add_(xtx)  # an fp32 gram is widened element by element (exactly) into fp64
        self.n += x.shape[0]

    def mean_square(self) -> torch.Tensor:
        """Each input column's mean squared activation over the tokens seen (fp32 [cols]):
        llama.cpp's importance matrix, ``diag(matrix()) / 2``."""
        if self._diag is not None:
            return (self._diag / self.n).float()
        return (self._require_sum().diagonal() / self.n).float()

    def matrix(self) -> torch.Tensor:
        """``2/n X^T X`` in fp32, converted a band of rows at a time: the values of
        ``(2/n * sum).float()`` without an fp64 temporary the size of the sum (1.6 GB for an 8B
        model's down_proj)."""
        s = self._require_sum()
        out = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        step = max(1, (1 << 22) // max(1, s.shape[1]))
        for r in range(0, s.shape[0], step):
            out[r : r + step] = (2.0 / self.n * s[r : r + step]).float()
        return out

    def factor(self, damp: float, act_order: bool, *, release: bool = False) -> Factor:
        """:func:`factorize` of this Hessian, computed once per ``(damp, act_order)``: layers fed
        the same input (q/k/v, gate/up) share one Hessian and so one inverse Cholesky.
        ``release``: free the fp64 sum before factorising (only its diagonal is kept, for
        :meth:`mean_square`): a caller that needs nothing else of it halves the peak memory of
        a wide layer (no more :meth:`add`, :meth:`matrix` or other factors afterwards)."""
        key = (damp, act_order, self.n)
        if key not in self._factors:
            m = self.matrix()
            if release:
                self._diag = self._require_sum().diagonal().clone()
                self.sum = None
            self._factors[key] = factorize(m, damp, act_order, owned=True)
        return self._factors[key]


@dataclass(frozen=True)
class Factor:
    """What the column solver needs from a Hessian: its dead inputs (never seen non-zero), the
    column order (``perm``: descending diagonal with ``act_order``, else None) and the upper
    Cholesky factor of the damped inverse in that order."""

    dead: torch.Tensor  # bool [cols]
    perm: torch.Tensor | None
    hinv: torch.Tensor  # [cols, cols] upper, in ``perm`` order


def factorize(h: torch.Tensor, damp: float, act_order: bool, *, owned: bool = False) -> Factor:
    """The :class:`Factor` of Hessian ``h``. ``owned``: ``h`` is an fp32 temporary of the
    caller's, changed and freed here (no copy), so at most two matrices of its size are alive."""
    with single_thread():
        h = h.detach().float() if owned else h.detach().float().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(h), descending=True)
            h = h.index_select(0, perm)  # one permuted copy alive at a time
            h = h.index_select(1, perm)
        return Factor(dead, perm, _inverse_cholesky_owned(h, damp))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the caller's setting.

    GPTQ's column loop and the Cholesky inverse are thousands of small ops: with OpenMP threads
    on a busy 2-core machine they spend most of their time in barriers (``cholesky_inverse`` of a
    576 x 576 Hessian took 2.7 s on 2 contended threads, 0.045 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` of ``x`` ``[tokens, cols]`` in fp32 (:meth:`Hessian.add` widens it into its
    fp64 sum element by element, exactly, with no fp64 copy the size of the sum)."""
    x = x.float()
    return x.T @ x


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising damping if needed."""
    return _inverse_cholesky_owned(h.detach().float().clone(), damp)


def _inverse_cholesky_owned(h: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`inverse_cholesky` of an fp32 ``h`` it may change and free: the damping goes onto
    the diagonal in place and every intermediate is dropped as soon as it is used, so at most
    three matrices of ``h``'s size are alive (an 8B model's down_proj: 0.8 GB each)."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    d = damp
    # With J the reversal permutation and J H J = L L^T, U = J L^-1 J is upper triangular with a
    # positive diagonal and U^T U = H^-1: the Cholesky factor of the inverse from one
    # factorisation and one triangular solve (instead of factor, invert, factor again; about
    # the same work on this CPU). fp32, as the GPTQ reference (half the fp64 time): the damping
    # keeps it well conditioned, and a failure or a non-finite factor raises the damping.
    flipped = h.flip(0, 1)
    del h
    diag0 = flipped.diagonal().clone()
    for _ in range(6):
        # flipped + d * mean * I, written onto the diagonal (the same fp32 sums)
        flipped.diagonal().copy_(diag0 + d * max(mean_diag, 1e-8))
        chol, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            del flipped  # three matrices at most: the factor, the identity, the solve
            # (a fresh output: solving in place into the identity rounds differently)
            eye = torch.eye(n, device=chol.device)
            linv = torch.linalg.solve_triangular(chol, eye, upper=False)
            up = linv.flip(0, 1)
            del linv
            if bool(torch.isfinite(up).all()):
                return up
            # rare (an ill-conditioned factor): rebuild the matrix from its factor (its
            # off-diagonal entries up to rounding) and retry with more damping
            flipped = chol @ chol.T
            del chol, up
        d *= 10
    raise ConfigError(
        f"the layer's Hessian is not positive definite even with damp={d:g}: "
        "use more calibration tokens (--calib-n) or a larger damp"
    )


@dataclass(frozen=True)
class PruneRule:
    """SparseGPT's adaptive mask selection: ``sparsity`` of each column block (unstructured), or
    ``n`` of every ``m`` consecutive input columns (``n:m``, e.g. 2:4 prunes 2 of 4)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor | Factor,
    round_col: RoundFn,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ-round ``w`` ``[rows, cols]`` given input Hessian ``h`` ``[cols, cols]`` (or its
    :class:`Factor`, e.g. ``Hessian.factor(damp, act_order)``, shared between layers).

    ``mask`` (bool ``[rows, cols]``, True = keep): pruned weights are forced to zero and their
    error is spread like a rounding error (SparseGPT's reconstruction with a fixed mask). Returns
    the rounded weight in fp32 (original column order).
    """
    q, _ = obs_solve(
        w, h, round_col, block_size=block_size, damp=damp, act_order=act_order, mask=mask
    )
    return q


def obs_solve(
    w: torch.Tensor,
    h: torch.Tensor | Factor,
    round_col: RoundFn | None,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    mask: torch.Tensor | None = None,
    prune: PruneRule | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The optimal-brain-surgeon column solver shared by GPTQ and SparseGPT.

    Each column is rounded (``round_col``; None keeps its value) and/or pruned (a fixed ``mask``,
    or masks chosen as the solve goes by ``prune``: at each block, or each ``m`` columns for
    n:m, the weights with the least ``w^2 / [H^-1]_jj^2`` are dropped), and its error is spread
    over the columns not yet visited. Returns ``(weight, keep-mask or None)``. A precomputed
    :class:`Factor` must have been made with the same ``damp`` and ``act_order``.
    """
    if prune is not None and (act_order or mask is not None):
        raise ConfigError("adaptive pruning needs act_order=false and no fixed mask")
    f = h if isinstance(h, Factor) else factorize(h, damp, act_order)
    if (f.perm is not None) != act_order:
        raise ValueError("the Hessian factor was made with another act_order")
    with single_thread():
        return _obs_solve(w, f, round_col, block_size, mask, prune)


def _obs_solve(
    w: torch.Tensor,
    f: Factor,
    round_col: RoundFn | None,
    block_size: int,
    mask: torch.Tensor | None,
    prune: PruneRule | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = w.detach().float().clone()
    rows, cols = w.shape
    w[:, f.dead] = 0.0
    perm = f.perm
    if perm is not None:
        w = w[:, perm]
        if mask is not None:
            mask = mask[:, perm]
    if prune is not None:
        mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    order = perm.tolist() if perm is not None else list(range(cols))
    hinv = f.hinv  # [cols, cols], upper
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if prune is not None and not prune.m:
            score = w1.pow(2) / d1.pow(2)  # [rows, B]
            k = round(score.numel() * prune.sparsity)
            drop = torch.zeros(score.numel(), dtype=torch.bool, device=w.device)
            if k:
                drop[torch.topk(score.reshape(-1), k, largest=False).indices] = True
            mask[:, i1:i2] = ~drop.reshape(score.shape)
        for i in range(i2 - i1):
            if prune is not None and prune.m and i % prune.m == 0:
                j2 = min(i + prune.m, i2 - i1)
                score = w1[:, i:j2].pow(2) / d1[i:j2].pow(2)
                drop_idx = torch.topk(score, min(prune.n, j2 - i), dim=1, largest=False).indices
                keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop_idx, False)
                mask[:, i1 + i : i1 + j2] = keep
            col = w1[:, i : i + 1]  # [rows, 1]
            if mask is not None:
                col = col * mask[:, i1 + i : i1 + i + 1]
            qc = round_col(col, order[i1 + i]) if round_col is not None else col
            if mask is not None:
                qc = qc * mask[:, i1 + i : i1 + i + 1]
            q[:, i1 + i : i1 + i + 1] = qc
            e = (w1[:, i : i + 1] - qc) / hinv1[i, i]
            w1[:, i:].sub_(e @ hinv1[i : i + 1, i:])
            err1[:, i : i + 1] = e
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm)
        q = q[:, inv]
        mask = mask[:, inv] if mask is not None else None
    return q, mask
