"""``prune(method, sparsity, pattern)``: magnitude, Wanda and SparseGPT pruning.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress
    >>> model, tok, _ = tiny_model()
    >>> cm = compress(model, "prune(method=magnitude, pattern=2:4)")
    >>> cm.manifest.layers["model.layers.0.mlp.up_proj"]["sparsity"]
    0.5

- ``magnitude``: drop the smallest ``|W|`` of each layer (layer-wise; no calibration).
- ``wanda`` (Sun et al., 2024): drop the smallest ``|W_ij| * ||X_j||`` in each output row, with
  ``||X_j||`` the norm of input channel j over the calibration tokens.
- ``sparsegpt`` (Frantar & Alistarh, 2023): choose masks block by block from ``w^2 / [H^-1]_jj^2``
  and update the remaining weights to compensate (the GPTQ solver of
  :mod:`joules.compress.solvers.hessian`, with no rounding).

``pattern``: ``unstructured`` (``sparsity`` of the weights), or ``n:m`` (``n`` of every ``m``
consecutive input columns pruned: ``2:4`` is NVIDIA's semi-structured sparsity). Calibrated
methods run block by block, so block i sees the inputs of the already-pruned blocks 0..i-1.
Masks are kept as a 1-bit-per-weight bitmap; a following quantization step (``| gptq(...)``,
``| rtn(...)``) keeps pruned weights at zero. The model itself stays dense (zeros are stored and
multiplied): on this CPU there is no sparse kernel, so pruning saves no time here. The manifest
reports each layer's real sparsity and, for ``n:m``, the bits/weight of the compressed n:m layout
(kept values plus ``ceil(log2 m)``-bit indices) that a sparse kernel would read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from joules.compress.context import BlockInputs, CompressContext, dense_weight, replace_module
from joules.compress.modules.linear import CompressedLinear, PrunedLinear
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.hessian import Hessian, PruneRule, gram, obs_solve
from joules.errors import ConfigError

Method = Literal["magnitude", "wanda", "sparsegpt"]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``unstructured`` -> (0, 0); ``n:m`` -> (n, m) with 0 < n < m."""
    if pattern == "unstructured":
        return 0, 0
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(
            f"prune pattern '{pattern}': use 'unstructured' or n:m with 0 < n < m (2:4, 4:8)"
        )
    return int(m.group(1)), int(m.group(2))


def select_mask(
    score: torch.Tensor, sparsity: float, n: int, m: int, per_row: bool
) -> torch.Tensor:
    """Keep-mask dropping the lowest scores: exactly ``round(sparsity * count)`` per row (or per
    layer), or ``n`` of every ``m`` consecutive columns."""
    rows, cols = score.shape
    if m:
        groups = score.reshape(rows, cols // m, m)
        drop = torch.topk(groups, n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, cols)
    if per_row:
        k = round(cols * sparsity)
        keep = torch.ones_like(score, dtype=torch.bool)
        if k:
            keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return keep
    k = round(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.reshape(-1), k, largest=False).indices] = False
    return keep.reshape(rows, cols)


@register_step("prune")
@dataclass(kw_only=True)
class Prune(Step):
    """Magnitude, Wanda or SparseGPT pruning, unstructured or N:M (see the module doc)."""

    layered = True  # reads weights one decoder block at a time

    method: Method = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    damp: float = 0.01
    block_size: int = 128

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method != "magnitude"

    def validate(self) -> None:
        n, m = parse_pattern(self.pattern)
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"prune sparsity={self.sparsity}: use a value in (0, 1), e.g. 0.5")
        if m and abs(self.sparsity - 0.5) > 1e-12 and abs(self.sparsity - n / m) > 1e-12:
            raise ConfigError(
                f"prune pattern {self.pattern} fixes the sparsity at {n / m:g}: drop sparsity="
                f"{self.sparsity} or use pattern=unstructured"
            )
        if m and self.block_size % m:
            raise ConfigError(f"prune block_size={self.block_size} must be a multiple of m={m}")

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    @property
    def effective_sparsity(self) -> float:
        n, m = self.nm
        return n / m if m else self.sparsity

    def _check_shape(self, name: str, module: nn.Module) -> None:
        if isinstance(module, CompressedLinear):
            raise ConfigError(
                f"'{name}' is already quantized: put prune(...) before the quantization step"
            )
        _, m = self.nm
        if m and module.in_features % m:
            raise ConfigError(
                f"prune {self.pattern}: '{name}' has {module.in_features} input columns, not a "
                f"multiple of {m}"
            )

    def _install(
        self,
        ctx: CompressContext,
        name: str,
        module: nn.Module,
        w: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        ctx.manifest.record_weight_error(name, dense_weight(module), w.to(module.weight.dtype))
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype))
        pruned = PrunedLinear.from_linear(module, keep)
        replace_module(ctx.model, name, pruned)
        n, m = self.nm
        sparsity = 1.0 - float(keep.float().mean())
        entry = {
            "method": f"prune-{self.method}",
            "pattern": self.pattern,
            "sparsity": round(sparsity, 6),
            "shape": list(w.shape),
            "bits_per_weight": 8 * module.weight.element_size() + 1.0,
            "nbytes": module.weight.numel() * module.weight.element_size()
            + int(pruned.mask_bits.numel()),
        }
        if m:
            # A compressed n:m layout: fp16 kept values plus ceil(log2 m)-bit indices.
            entry["nm_layout_fp16_bits_per_weight"] = (1 - n / m) * (16 + math.ceil(math.log2(m)))
        ctx.record(name, **entry)

    def apply(self, ctx: CompressContext) -> None:
        targets = ctx.resolve_targets(self.targets)
        for name, mod in targets.items():
            self._check_shape(name, mod)
        n, m = self.nm
        if self.method == "magnitude":
            for name, mod in ctx.each_target(targets):
                w = dense_weight(mod)
                keep = select_mask(w.abs(), self.sparsity, n, m, per_row=False)
                self._install(ctx, name, mod, w * keep, keep)
            return
        by_block = ctx.by_block(
            targets,
            f"prune(method={self.method}) calibrates block by block: '{{name}}' is outside "
            "the decoder blocks (use method=magnitude for it)",
        )

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            mods = by_block.get(i, {})
            if self.method == "wanda":
                sq = {k: torch.zeros(v.in_features, dtype=torch.float64) for k, v in mods.items()}
                for batch in inputs.batches(block, mods):
                    for k, x in batch.items():
                        sq[k] += x.double().pow(2).sum(0)
                for k, mod in mods.items():
                    w = dense_weight(mod)
                    score = w.abs() * sq[k].sqrt().float()
                    keep = select_mask(score, self.sparsity, n, m, per_row=True)
                    self._install(ctx, f"{block_name}.{k}", mod, w * keep, keep)
            else:
                hs = {k: Hessian(v.in_features) for k, v in mods.items()}
                for batch in inputs.batches(block, mods):
                    grams: dict[int, torch.Tensor] = {}
                    for k, x in batch.items():
                        if id(x) not in grams:
                            grams[id(x)] = gram(x)
                        hs[k].add(x, grams[id(x)])
                for k, mod in mods.items():
                    rule = PruneRule(self.sparsity, n, m)
                    w, keep = obs_solve(
                        dense_weight(mod),
                        hs[k].matrix(),
                        None,
                        block_size=self.block_size,
                        damp=self.damp,
                        act_order=False,
                        prune=rule,
                    )
                    assert keep is not None
                    self._install(ctx, f"{block_name}.{k}", mod, w, keep)

        ctx.sequential(fn, step="prune", blocks=set(by_block))
