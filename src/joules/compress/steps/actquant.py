"""``act_quant(format, granularity=per-token, outlier_channels=0)``: quantized linear inputs.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, _ = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "act_quant(format=int4-g16, outlier_channels=16) | rtn(format=int4-g16)",
    ...               calibration=calib)
    >>> lin = model.model.layers[0].mlp.down_proj
    >>> type(lin.act_quant).__name__, type(lin.sparse).__name__
    ('ActQuant', 'OutlierColumns')

**Emulated**: activations are rounded to the format (fake quantization in fp32) and the matmul
runs in floating point; no integer GEMM runs here. The numbers measure the *accuracy* of W8A8 /
W4A4, not their speed or energy.

* ``granularity=per-token`` (dynamic): each token's row gets its own parameters at run time (a
  per-tensor format such as ``int8`` is applied per row; a grouped format such as ``int4-g64``
  per row and group). ``per-tensor`` (static): one range per layer input, fixed from the
  calibration tokens; needs a per-tensor format whose parameters come from the range (``int8``,
  ``fp8-e4m3``...).
* ``outlier_channels=k`` (Atom, Zhao et al., 2024): the k input channels of largest calibration
  magnitude are moved to the end (the weight's columns are permuted the same way, so ``x W^T``
  is unchanged) and kept in 8 bit -- the activations per token in ``int8``, the weight columns
  in ``int8-ch`` (an :class:`~joules.compress.solvers.plan.OutlierColumns` part counted in
  bits/weight). The rest is contiguous, so the low-bit part stays a dense grouped matrix. ``k``
  must be a multiple of the format's group size.

Where it attaches: before a weight step (the reference recipes put ``act_quant`` first), each
target ``nn.Linear`` becomes an :class:`ActQuantLinear` (permuted weight, ``act_quant``
submodule); the weight step then sees it as a linear whose calibration inputs are the
*quantized, permuted* activations (so GPTQ's Hessian is the one the weight really meets), rounds
the outlier columns in 8 bit, and moves ``act_quant`` onto the ``CompressedLinear``, whose
``forward`` applies it. After a weight step (``rtn(...) | act_quant(...)``) it attaches directly
to the ``CompressedLinear`` (``outlier_channels=0`` only: a packed weight is not re-permuted).
Without a weight step the model is W16A-k (``ActQuantLinear`` is saved and reloaded as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from joules import formats
from joules.compress.context import BlockInputs, CompressContext, replace_module
from joules.compress.modules.linear import (
    CompressedLinear,
    dtype_from_name,
    dtype_name,
    register_module,
)
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.plan import ColumnSplitPlan
from joules.compress.steps.rtn import check_format
from joules.errors import ConfigError

OUTLIER_ACT_FORMAT = "int8"  # outlier channels' activations: int8 per token


def _per_token(fmt: formats.Format, x: torch.Tensor) -> torch.Tensor:
    """``x`` [tokens, n] rounded with parameters per token (and per group for grouped formats)."""
    grouping = getattr(fmt, "grouping", None)
    if grouping is not None and grouping.kind == "tensor":
        return fmt._values(x, fmt._params(x))  # type: ignore[attr-defined]
    return fmt.fake_quant(x)


@register_module("act_quant")
class ActQuant(nn.Module):
    """Fake-quantizes a linear's input ``[..., in_features]`` (see the module docstring)."""

    def __init__(
        self,
        spec: str,
        granularity: str,
        in_features: int,
        outlier_channels: int = 0,
    ) -> None:
        super().__init__()
        self.spec, self.granularity = spec, granularity
        self.in_features, self.outlier_channels = in_features, outlier_channels
        self.fmt = formats.get(spec)
        self.hi = formats.get(OUTLIER_ACT_FORMAT)
        if outlier_channels:
            self.register_buffer("perm", torch.arange(in_features))
        if granularity == "per-tensor":
            self.register_buffer("range", torch.zeros(2))  # calibration [min, max]
        self._static: dict[str, torch.Tensor] | None = None

    def set_range(self, lo: float, hi: float) -> None:
        self.range.copy_(torch.tensor([lo, hi]))
        self._static = None

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "per-token":
            return _per_token(self.fmt, x)
        if self._static is None:
            self._static = self.fmt._params(self.range.float().reshape(1, 2))  # type: ignore[attr-defined]
        return self.fmt._values(x, self._static)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        k = self.outlier_channels
        if k:
            x2 = x2.index_select(1, self.perm)
            b = shape[-1] - k
            x2 = torch.cat([self._quant(x2[:, :b]), _per_token(self.hi, x2[:, b:])], dim=1)
        else:
            x2 = self._quant(x2)
        return x2.to(dtype).reshape(shape)

    def export_config(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "granularity": self.granularity,
            "in_features": self.in_features,
            "outlier_channels": self.outlier_channels,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ActQuant:
        return cls(cfg["spec"], cfg["granularity"], cfg["in_features"], cfg["outlier_channels"])

    def extra_repr(self) -> str:
        return f"{self.spec}, {self.granularity}, outliers={self.outlier_channels} (emulated)"


@register_module("act_quant_linear")
class ActQuantLinear(nn.Linear):
    """An ``nn.Linear`` (weight columns permuted as its ``act_quant`` permutes inputs) whose
    forward quantizes its input. Weight steps treat it as a linear."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.act_quant: ActQuant | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, aq: ActQuant) -> ActQuantLinear:
        m = cls(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype
        ).to(linear.weight.device)
        w = linear.weight.detach()
        if aq.outlier_channels:
            w = w.index_select(1, aq.perm.to(w.device))
        with torch.no_grad():
            m.weight.copy_(w)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        m.act_quant = aq
        if aq.outlier_channels:
            m.weight_plan = ColumnSplitPlan(aq.outlier_channels)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight, self.bias)

    def export_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.weight.dtype),
            "act_quant": {"type": "act_quant", "config": self.act_quant.export_config()}
            if self.act_quant is not None
            else None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ActQuantLinear:
        m = cls(cfg["in_features"], cfg["out_features"], cfg["bias"], dtype_from_name(cfg["dtype"]))
        if cfg.get("act_quant"):
            m.act_quant = ActQuant.from_config(cfg["act_quant"]["config"])
        return m


def _group_size(spec: str) -> int:
    g = getattr(formats.get(spec), "grouping", None)
    return g.size if g is not None and g.kind == "group" else 1


@register_step("act_quant")
@dataclass(kw_only=True)
class ActQuantStep(Step):
    """Quantize the inputs of the target linears (emulated; see the module docstring)."""

    format: str
    granularity: Literal["per-token", "per-tensor"] = "per-token"
    outlier_channels: int = 0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.granularity == "per-tensor" or self.outlier_channels > 0

    def validate(self) -> None:
        check_format(self.format, "act_quant")
        fmt = formats.get(self.format)
        if not hasattr(fmt, "_params") and (
            self.granularity == "per-tensor" or getattr(fmt, "grouping", None) is None
        ):
            raise ConfigError(
                f"act_quant(format={self.format}): activations need a group-wise format "
                "(int, fp8, mx, nf4...): e.g. int8 or int4-g64"
            )
        if self.granularity == "per-tensor" and fmt.grouping.kind != "tensor":  # type: ignore[attr-defined]
            raise ConfigError(
                f"act_quant(format={self.format}, granularity=per-tensor): static per-tensor "
                "needs a per-tensor format such as int8 or fp8-e4m3 (or use granularity=per-token)"
            )
        g = _group_size(self.format)
        if self.outlier_channels < 0 or self.outlier_channels % g:
            raise ConfigError(
                f"act_quant outlier_channels={self.outlier_channels}: use 0 or a positive "
                f"multiple of {self.format}'s group size {g} (e.g. {g if g > 1 else 64})"
            )

    def apply(self, ctx: CompressContext) -> None:
        targets = ctx.resolve_targets(self.targets)
        for name, m in targets.items():
            if isinstance(m, ActQuantLinear) or getattr(m, "act_quant", None) is not None:
                raise ConfigError(
                    f"act_quant: '{name}' already quantizes its input (one per layer)"
                )
            if m.in_features <= self.outlier_channels:
                raise ConfigError(
                    f"act_quant outlier_channels={self.outlier_channels}: '{name}' has only "
                    f"{m.in_features} input channels: use fewer outlier channels"
                )
            if isinstance(m, CompressedLinear) and self.outlier_channels:
                raise ConfigError(
                    f"act_quant with outlier_channels: '{name}' is already quantized; put "
                    "act_quant before the weight step (e.g. act_quant(...) | gptq(...))"
                )
        if not self.needs_calibration:
            for name, m in targets.items():
                self._attach(ctx, name, m, None)
            return
        by_block = ctx.by_block(
            targets, "act_quant with calibration targets decoder-block linears only, not '{name}'"
        )

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            mods = by_block.get(i, {})
            amax: dict[str, torch.Tensor] = {}
            lo: dict[str, float] = {}
            hi: dict[str, float] = {}
            shares: dict[str, int] = {}
            for batch in inputs.batches(block, mods):
                for rel, x in batch.items():
                    shares[rel] = id(x)
                    a = x.abs().amax(dim=0)
                    amax[rel] = torch.maximum(amax[rel], a) if rel in amax else a
                    lo[rel] = min(lo.get(rel, 0.0), float(x.min()))
                    hi[rel] = max(hi.get(rel, 0.0), float(x.max()))
            made: dict[int, ActQuant] = {}  # q/k/v (gate/up) share one input: one quantizer
            for rel, m in mods.items():
                key = shares[rel]
                aq = made.get(key) or self._quantizer(m.in_features, amax[rel], lo[rel], hi[rel])
                made[key] = aq
                self._attach(ctx, f"{block_name}.{rel}", m, aq)

        ctx.sequential(fn, step="act_quant", blocks=set(by_block))

    def _quantizer(self, d: int, amax: torch.Tensor, lo: float, hi: float) -> ActQuant:
        aq = ActQuant(self.format, self.granularity, d, self.outlier_channels)
        if self.outlier_channels:
            order = torch.argsort(amax, descending=True, stable=True)
            top = order[: self.outlier_channels]
            keep = torch.ones(d, dtype=torch.bool)
            keep[top] = False
            rest = torch.arange(d)[keep]
            aq.perm.copy_(torch.cat([rest, top.flip(0)]))  # outliers last, largest at the end
        if self.granularity == "per-tensor":
            aq.set_range(lo, hi)
        return aq

    def _attach(self, ctx: CompressContext, name: str, m: nn.Module, aq: ActQuant | None) -> None:
        if aq is None:
            aq = ActQuant(self.format, self.granularity, m.in_features, 0)
        dense = isinstance(m, nn.Linear)
        aq = aq.to(m.weight.device if dense else next(m.buffers()).device)
        if isinstance(m, CompressedLinear):
            m.act_quant = aq
        else:
            replace_module(ctx.model, name, ActQuantLinear.from_linear(m, aq))
        ctx.record(
            name,
            act_format=self.format,
            act_granularity=self.granularity,
            outlier_channels=self.outlier_channels,
            act_emulated=True,
        )
