"""``smoothquant(alpha=0.5)``: migrate activation outliers into the weights (Xiao et al., 2023).

    >>> import torch
    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, _ = calibration_tokens(tok, n=4, length=32)
    >>> ids = calib[:1]
    >>> before = model(ids).logits
    >>> cm = compress(model, "smoothquant(alpha=0.5)", calibration=calib)
    >>> bool(torch.allclose(model(ids).logits, before, atol=1e-4))   # fp outputs unchanged
    True

Per input channel j of a group of linears fed the same tensor X, ``s_j = max|X_j|^alpha /
max|W_{:,j}|^(1-alpha)`` (max over calibration tokens, and over every consumer's weight column).
``X`` is divided by ``s`` inside the module that produces it and the consumers' columns are
multiplied by it, so ``X W^T`` is unchanged in exact arithmetic while the activation range
flattens (easier to quantize) and the weight range grows a little. Producers folded here:
``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up (RMSNorm weights), and
``up_proj`` rows -> ``down_proj`` (the SiLU-gated product is linear in ``up``). ``o_proj`` is
not smoothed (its input comes through attention; with grouped KV heads a per-channel fold into
``v_proj`` is not exact for every layout). Put it *before* ``act_quant`` and the weight steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from joules.compress.context import BlockInputs, CompressContext
from joules.compress.modules.linear import CompressedLinear
from joules.compress.recipe import Step, register_step
from joules.errors import ConfigError

# (producer, consumers) relative to a decoder block: llama / qwen2 / mistral naming.
SMOOTH_PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def smoothing_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)`` (1 where the channel never fires)."""
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    s = s.clamp(min=1e-5)
    return torch.where(act_absmax > 0, s, torch.ones_like(s))


def fold_scales(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s``, multiply the consumers' columns by it."""
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.to(producer.weight.dtype)[:, None])
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        else:  # RMSNorm / LayerNorm: a per-channel gain (and bias)
            producer.weight.div_(s.to(producer.weight.dtype))
            b = getattr(producer, "bias", None)
            if isinstance(b, torch.Tensor):
                b.div_(s.to(b.dtype))
        for c in consumers:
            c.weight.mul_(s.to(c.weight.dtype)[None, :])


@register_step("smoothquant")
@dataclass(kw_only=True)
class SmoothQuant(Step):
    """Fold per-channel smoothing scales into producer/consumer pairs (fp outputs unchanged)."""

    layered = True  # reads weights one decoder block at a time

    alpha: float = 0.5

    needs_calibration = True

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"smoothquant alpha={self.alpha}: use a value in [0, 1] (0.5 is the paper's)"
            )

    def apply(self, ctx: CompressContext) -> None:
        targets = set(ctx.resolve_targets(self.targets))
        done: list[str] = []

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            mods = dict(block.named_modules())
            pairs = []
            for prod, cons in SMOOTH_PAIRS:
                if prod not in mods or not all(c in mods for c in cons):
                    continue
                if not all(f"{block_name}.{c}" in targets for c in cons):
                    continue
                for c in (prod, *cons):
                    if isinstance(mods[c], CompressedLinear) or hasattr(mods[c], "act_quant"):
                        raise ConfigError(
                            f"smoothquant: '{block_name}.{c}' is already quantized: put "
                            "smoothquant first in the recipe, before act_quant and weight steps"
                        )
                pairs.append((prod, cons))
            if not pairs:
                return
            watch = {c: mods[c] for _, cons in pairs for c in cons}
            amax: dict[str, torch.Tensor] = {}
            for batch in inputs.batches(block, watch):
                for name, x in batch.items():
                    m = x.abs().amax(dim=0)
                    amax[name] = torch.maximum(amax[name], m) if name in amax else m
            # Fold in order: gate/up before up -> down would change up's rows after reading them,
            # which is fine (down's statistics were taken before any fold in this block).
            for prod, cons in pairs:
                consumers = [mods[c] for c in cons]
                s = smoothing_scales(
                    amax[cons[0]], [c.weight.detach().float() for c in consumers], self.alpha
                )
                fold_scales(mods[prod], consumers, s)
                for c in cons:
                    ctx.record(f"{block_name}.{c}", smoothquant_alpha=self.alpha)
                done.append(f"{block_name}.{prod}")

        ctx.sequential(fn, step="smoothquant")
        if not done:
            raise ConfigError(
                "smoothquant found no producer/consumer pair to smooth among the targets: it "
                "knows llama-style blocks (input_layernorm -> q/k/v, post_attention_layernorm "
                "-> gate/up, up_proj -> down_proj)"
            )
        ctx.manifest.notes.append(
            f"smoothquant(alpha={self.alpha}) folded scales into {len(done)} producers"
        )
