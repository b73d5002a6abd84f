"""``gptq(format, act_order=true, damp=0.01, block_size=128)``: Hessian-aware rounding.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, _ = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "gptq(format=int4-g32)", calibration=calib)
    >>> sorted({v["method"] for v in cm.manifest.layers.values()})
    ['gptq']

Sequential, block by block: the Hessians of block i's linears are accumulated from calibration
inputs that went through blocks 0..i-1 *already quantized*, then every linear of the block is
rounded by :func:`joules.compress.solvers.hessian.gptq_quantize`. Groups are static: each group's
parameters are fixed from the weight before the column pass (``Format.fit``), so with
``act_order`` the packed layout stays contiguous (no ``g_idx``) and kernels and GGUF blocks stay
valid. Targets outside the decoder blocks (``lm_head``) get their Hessian from the final
hidden states after the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from joules import formats
from joules.compress.context import (
    BlockInputs,
    CompressContext,
    dense_weight,
    install_quantized,
    weight_mask,
)
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.hessian import Hessian, gptq_quantize
from joules.compress.solvers.plan import fit_weight, sparse_part
from joules.compress.steps.rtn import check_format
from joules.errors import ConfigError, UnsupportedModelError


def hessians(
    inputs: BlockInputs, block: nn.Module, modules: dict[str, nn.Module]
) -> dict[str, Hessian]:
    """Input Hessians of ``modules`` (names relative to ``block``) over the calibration inputs."""
    hs: dict[str, Hessian] = {}
    for batch in inputs.batches(block, modules):
        if not hs:  # modules fed the same tensor (q/k/v, gate/up) share one Hessian
            by_input: dict[int, Hessian] = {}
            hs = {
                n: by_input.setdefault(id(x), Hessian(x.shape[-1], x.device))
                for n, x in batch.items()
            }
        fed: dict[int, tuple[Hessian, torch.Tensor, str]] = {}
        for n, x in batch.items():
            h = hs[n]
            first = fed.setdefault(id(h), (h, x, n))
            if first[1] is not x:  # the sharing was fixed from the first mini-batch
                raise UnsupportedModelError(
                    f"'{first[2]}' and '{n}' shared one input in the first calibration "
                    "mini-batch but not in a later one: their Hessians cannot be shared"
                )
        for h, x, _ in fed.values():
            h.add(x)  # once per distinct input
    return {n: hs.get(n, Hessian(m.in_features)) for n, m in modules.items()}


@register_step("gptq")
@dataclass(kw_only=True)
class GPTQ(Step):
    format: str
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    # "GLOB=FORMAT" per-module formats, first match wins (else ``format``): one sequential pass
    # for a per-tensor type mix such as llama.cpp's Q4_K_M.
    overrides: tuple[str, ...] = ()
    # fit the block scales of formats whose scale search takes weights (gguf-q4_0, gguf-q5_0,
    # gguf-iq4_nl, gguf-iq4_xs) with the layer's importance matrix: the calibration inputs' mean squared
    # activation per column, the Hessian's diagonal / 2, what llama-imatrix computes. The
    # columns are then rounded on those scales.
    imatrix: bool = True

    needs_calibration = True
    layered = True  # reads weights one decoder block at a time

    def format_for(self, name: str) -> str:
        """The format of module ``name``: the first matching override's, else ``format``."""
        import fnmatch

        for o in self.overrides:
            pat, _, spec = o.rpartition("=")
            if fnmatch.fnmatchcase(name, pat):
                return spec
        return self.format

    def validate(self) -> None:
        check_format(self.format, "gptq")
        for o in self.overrides:
            pat, _, spec = o.rpartition("=")
            if not pat or not spec:
                raise ConfigError(
                    f"gptq overrides entry {o!r}: write GLOB=FORMAT, e.g. '*.mlp.down_proj=int8-ch'"
                )
            check_format(spec, "gptq")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"gptq damp={self.damp}: use a value in [0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise ConfigError(
                f"gptq block_size={self.block_size}: use a positive integer, e.g. 128"
            )

    def quantize_layer(
        self, ctx: CompressContext, name: str, module: nn.Module, h: Hessian
    ) -> None:
        w = dense_weight(module)
        mask = weight_mask(module)
        fmt = formats.get(self.format_for(name))
        use = fmt.for_shape(tuple(w.shape))  # llama.cpp's per-tensor GGUF fallback
        im = h.mean_square() if self.imatrix and getattr(use, "takes_imatrix", False) else None
        fitted = fit_weight(module, use.spec, w * mask if mask is not None else w, imatrix=im)
        q = gptq_quantize(
            w,
            # shared by layers fed the same input; nothing else reads the sum afterwards, so
            # it is freed first (a wide layer's fp64 sum is as large as two fp32 matrices)
            h.factor(self.damp, self.act_order, release=True),
            fitted.fake_quant_cols,
            block_size=self.block_size,
            damp=self.damp,
            act_order=self.act_order,
            mask=mask,
        )
        install_quantized(ctx, name, module, fitted.quantize(q), "gptq", sparse_part(fitted, q))
        if use.spec != fmt.spec:
            ctx.record(name, format_requested=fmt.spec)
        if getattr(fitted, "imatrix_weighted", False):  # a weight plan's split fits unweighted
            ctx.record(name, scales="imatrix-weighted")

    def apply(self, ctx: CompressContext) -> None:
        targets = ctx.resolve_targets(self.targets)
        by_block, outside = ctx.split_by_block(targets)

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            mods = by_block.get(i, {})
            for rel, h in hessians(inputs, block, mods).items():
                self.quantize_layer(ctx, f"{block_name}.{rel}", mods[rel], h)

        if outside and ctx.offload is not None:
            raise ConfigError(
                f"gptq of '{next(iter(outside))}' needs the final hidden states of the whole "
                "model: layer-by-layer compression quantizes decoder-block linears only "
                "(compress in memory, or leave it out of the targets)"
            )
        blocks = set(by_block) if not outside else None
        ctx.sequential(fn, step="gptq", blocks=blocks or None)
        if outside:
            self._outside(ctx, outside)

    def _outside(self, ctx: CompressContext, outside: dict[str, nn.Module]) -> None:
        """lm_head and other linears after the blocks: Hessians from the final hidden states."""
        calib = ctx.require_calibration("gptq")
        hs = {n: Hessian(m.in_features) for n, m in outside.items()}
        handles = []
        for n, m in outside.items():
            handles.append(
                m.register_forward_pre_hook(lambda _m, a, n=n: hs[n].add(a[0].detach().float()))
            )
        try:
            with torch.no_grad():
                for b in range(0, len(calib), ctx.batch_size):
                    ctx.model(input_ids=calib[b : b + ctx.batch_size], use_cache=False)
        finally:
            for hd in handles:
                hd.remove()
        for n, m in outside.items():
            self.quantize_layer(ctx, n, m, hs[n])
