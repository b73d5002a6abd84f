"""``rtn(format)``: round every targeted weight to nearest in a format of the lab.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress
    >>> model, tok, _ = tiny_model()
    >>> cm = compress(model, "rtn(format=int8-ch)")
    >>> round(cm.manifest.bits_per_weight, 3)
    8.25

No calibration: each weight's parameters (scales, minima...) come from the weight itself, exactly
as ``formats.get(format).quantize`` computes them. A pruned layer (``weight_mask``) keeps its
zeros at zero (the compressed layer keeps the mask and applies it when it decodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from joules import formats
from joules.compress.context import CompressContext, dense_weight, install_quantized, weight_mask
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.plan import fit_weight, sparse_part
from joules.errors import ConfigError


def check_format(spec: str, step: str) -> None:
    """Fail early, with the format registry's own one-line error, on an unknown format."""
    try:
        formats.get(spec)
    except ConfigError as exc:
        raise ConfigError(f"{step}(format={spec}): {exc}") from None


@register_step("rtn")
@dataclass(kw_only=True)
class RTN(Step):
    """Round to nearest; ``format`` is any weight format spec (``int8-ch``, ``mxfp4``...)."""

    layered = True  # reads weights one decoder block at a time

    format: str

    def validate(self) -> None:
        check_format(self.format, "rtn")

    def apply(self, ctx: CompressContext) -> None:
        fmt = formats.get(self.format)
        targets = ctx.resolve_targets(self.targets)
        for i, (name, module) in enumerate(ctx.each_target(targets)):
            w = dense_weight(module)
            mask = weight_mask(module)
            if mask is not None:
                w = w * mask  # pruned weights stay zero: the layer re-applies its mask
            use = fmt.for_shape(tuple(w.shape))  # llama.cpp's per-tensor GGUF fallback
            if getattr(module, "weight_plan", None) is not None:  # outliers / outlier channels
                fitted = fit_weight(module, use.spec, w)
                q = fitted.fake_quant(w)
                qt, sparse = fitted.quantize(q), sparse_part(fitted, q)
            else:
                qt, sparse = use.quantize(w), None
            install_quantized(ctx, name, module, qt, "rtn", sparse)
            if use.spec != fmt.spec:
                ctx.record(name, format_requested=fmt.spec)
            if ctx.progress:
                ctx.progress("rtn", i + 1, len(targets))
