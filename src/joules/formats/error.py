"""Error analysis of number formats: measured error next to the block-format theory.

    >>> import torch
    >>> from joules.formats.error import compare_formats
    >>> rows = compare_formats({"w": torch.randn(256, 256)}, ["int8", "mxfp4"])
    >>> [r.format for r in rows]
    ['int8', 'mxfp4']
    >>> rows[0].sqnr_db > rows[1].sqnr_db
    True

Measured (over every element of every tensor given): MSE, SQNR in dB
(``10 log10(sum x**2 / sum (x - Q(x))**2)``), max absolute error, max relative error
``|x - Q(x)| / |x|`` over nonzero x (1.0 wherever a small value rounds to zero), the fraction of
elements clipped (outside their group's representable range), and exact bits per element.

Theory (block formats: group-scaled int, MX, group-scaled minifloat), from the block
floating-point analyses (Kalliojarvi & Astola 1996, "Roundoff errors in block-floating-point
systems"; Soloveychik, Lyubarskii & Shmidt 2022, "Block format error bounds and optimal block
size selection"): with a shared exponent ``e_b = floor(log2 max|x|)`` per block and p mantissa bits
the step is ``2**(e_b + 1 - p)``, so (1) every in-range element errs by at most half its step --
``max_abs_error_bound`` -- and (2) under the uniform-noise model MSE = mean(step**2) / 12 --
``mse_model`` / ``sqnr_model_db``. :func:`gaussian_bfp_sqnr_db` gives the model's expectation for
i.i.d. Gaussian data as a function of block size and mantissa bits (larger blocks draw larger
maxima, hence larger shared exponents and steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from joules.formats.base import Format, Grouping, get
from joules.formats.minifloat import exp2i


@dataclass
class FormatError:
    """Error of one format over a set of tensors (aggregated over all their elements)."""

    format: str
    family: str
    bits_per_element: float
    numel: int
    tensors: int
    mse: float
    sqnr_db: float
    max_abs_error: float
    max_rel_error: float
    frac_clipped: float
    bound_max_abs_error: float | None = None
    mse_model: float | None = None
    sqnr_model_db: float | None = None
    emulated: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FormatError:
        return cls(**d)


@dataclass
class _Acc:
    sse: float = 0.0
    energy: float = 0.0
    n: int = 0
    bits: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    clipped: int = 0
    tensors: int = 0
    bound: float | None = None
    model_sse: float | None = None


def _sqnr_db(energy: float, sse: float) -> float:
    if sse == 0:
        return math.inf
    if energy == 0:
        return -math.inf
    return 10 * math.log10(energy / sse)


def _accumulate(acc: _Acc, fmt: Format, x: torch.Tensor, energy: float | None = None) -> None:
    """Add one tensor's error to ``acc``. In-place ops on the one error buffer: on a model's
    130M weights, temporaries cost more than the arithmetic."""
    xf = x.detach().float()
    err = fmt.fake_quant(xf).sub_(xf).abs_()  # [*x.shape]
    acc.sse += float(torch.linalg.vector_norm(err, dtype=torch.float64)) ** 2
    acc.energy += (
        float(torch.linalg.vector_norm(xf, dtype=torch.float64)) ** 2 if energy is None else energy
    )
    acc.n += xf.numel()
    acc.bits += fmt.total_bits(tuple(xf.shape))
    acc.tensors += 1
    if xf.numel():
        acc.max_abs = max(acc.max_abs, float(err.max()))
        rel = err.div_(xf.abs()).masked_fill_(xf == 0, 0.0)  # x == 0 has no relative error
        acc.max_rel = max(acc.max_rel, float(rel.max()))
        acc.clipped += int(fmt.clip_mask(xf).sum())
    model = fmt.error_model(xf)
    if model is not None:
        acc.bound = max(acc.bound or 0.0, model.max_abs_error_bound)
        acc.model_sse = (acc.model_sse or 0.0) + model.mse_model * xf.numel()


def _finish(fmt: Format, acc: _Acc) -> FormatError:
    n = max(acc.n, 1)
    model_mse = None if acc.model_sse is None else acc.model_sse / n
    return FormatError(
        format=fmt.name,
        family=fmt.family,
        bits_per_element=acc.bits / n,
        numel=acc.n,
        tensors=acc.tensors,
        mse=acc.sse / n,
        sqnr_db=_sqnr_db(acc.energy, acc.sse),
        max_abs_error=acc.max_abs,
        max_rel_error=acc.max_rel,
        frac_clipped=acc.clipped / n,
        bound_max_abs_error=acc.bound,
        mse_model=model_mse,
        sqnr_model_db=None if model_mse is None else _sqnr_db(acc.energy, model_mse * n),
        emulated=fmt.emulated,
    )


def format_error(fmt: Format | str, x: torch.Tensor) -> FormatError:
    """Error of one format on one tensor."""
    fmt = get(fmt) if isinstance(fmt, str) else fmt
    acc = _Acc()
    _accumulate(acc, fmt, x)
    return _finish(fmt, acc)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every nn.Linear weight of ``model`` by parameter name (tied weights once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight
            if w.data_ptr() in seen:
                continue
            seen.add(w.data_ptr())
            out[f"{name}.weight"] = w.detach()
    return out


def compare_formats(
    tensors_or_model: torch.nn.Module | torch.Tensor | Mapping[str, torch.Tensor],
    specs: Iterable[str | Format],
    progress: Callable[[str, str], None] | None = None,
) -> list[FormatError]:
    """Run every format over every tensor (a model: every Linear weight) and aggregate.

    Returns one :class:`FormatError` per format, in the order given. ``progress(spec, tensor)``
    is called before each (format, tensor) pair, for a progress bar.
    """
    if isinstance(tensors_or_model, torch.nn.Module):
        tensors = linear_weights(tensors_or_model)
    elif isinstance(tensors_or_model, torch.Tensor):
        tensors = {"tensor": tensors_or_model}
    else:
        tensors = dict(tensors_or_model)
    # signal energy once per tensor, not once per (format, tensor)
    energies = {
        n: float(torch.linalg.vector_norm(t.detach().float(), dtype=torch.float64)) ** 2
        for n, t in tensors.items()
    }
    results = []
    for spec in specs:
        fmt = get(spec) if isinstance(spec, str) else spec
        acc = _Acc()
        with torch.no_grad():
            for name, x in tensors.items():
                if progress is not None:
                    progress(fmt.name, name)
                _accumulate(acc, fmt, x, energies[name])
        results.append(_finish(fmt, acc))
    return results


# --------------------------------------------------------------------------------------------
# Block floating point theory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BFPBound:
    """Block floating-point error theory for one tensor (see the module docstring)."""

    block_size: int
    mantissa_bits: int
    max_abs_error_bound: float
    mse_model: float
    sqnr_model_db: float


def bfp_bound(x: torch.Tensor, block_size: int, mantissa_bits: int) -> BFPBound:
    """Theory for BFP on ``x``: blocks of ``block_size`` along the last dim share
    ``e_b = floor(log2 amax_b)``; elements are sign + ``mantissa_bits`` magnitude bits with the
    top bit worth ``2**e_b``, i.e. step ``2**(e_b + 1 - mantissa_bits)``. MXINT8 is p = 7."""
    g = Grouping("group", block_size).split(x)
    amax = g.abs().amax(dim=1)
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127
    step = torch.where(
        amax > 0, exp2i((e + 1 - mantissa_bits).clamp(-149, 127)), torch.zeros_like(amax)
    )
    mse = float((step.double() ** 2).mean() / 12)
    energy = float(g.double().square().mean())
    return BFPBound(block_size, mantissa_bits, float(step.max()) / 2, mse, _sqnr_db(energy, mse))


def gaussian_bfp_sqnr_db(block_size: int, mantissa_bits: int) -> float:
    """Expected model SQNR of BFP on i.i.d. N(0, 1) data: ``10 log10(1 / (E[step**2] / 12))``.

    ``E[step**2] = sum_k 4**(k + 1 - p) P(2**k <= M < 2**(k+1))`` where M is the max of
    ``block_size`` |N(0,1)| draws, ``P(M < t) = erf(t / sqrt 2) ** block_size``.
    """

    def cdf(t: float) -> float:
        return math.erf(t / math.sqrt(2)) ** block_size

    e_step2 = 0.0
    for k in range(-40, 10):
        p = cdf(2.0 ** (k + 1)) - cdf(2.0**k)
        e_step2 += p * 4.0 ** (k + 1 - mantissa_bits)
    return 10 * math.log10(12 / e_step2)
