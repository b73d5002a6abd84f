"""``gguf_mix(bytes=N)``: one GGUF type per tensor under a byte budget, then GPTQ into them.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model(hidden_size=256, intermediate_size=512)
    >>> calib, _ = calibration_tokens(tok, n=2, length=32)
    >>> r = "gguf_mix(bytes=800000, candidates=[gguf-q8_0, gguf-q4_0])"
    >>> cm = compress(model, r, calibration=calib)
    >>> mix = cm.manifest.gguf_export["mix"]
    >>> mix["bytes"] <= 800000, mix["embedding"] in mix["candidates"]
    (True, True)

llama.cpp's presets are fixed mixes (Q4_K_M: Q6_K for some ffn_down and attn_v, Q4_K for the
rest); this chooses the mix from measured sensitivity for a size. Every targeted linear -- and
the token embedding, which the GGUF export then stores in the chosen type (``manifest.gguf_export
["embedding"]``) -- is rounded to each candidate type (RTN, with llama.cpp's
per-tensor fallback where rows do not fit a type's blocks); each option's error is its empirical
Fisher-weighted squared error ``sum F * (W - Q)**2`` (F: squared per-sequence gradients of the LM
loss; for a tied embedding they include its use as the output head), and the exact knapsack
(:mod:`joules.compress.solvers.knapsack`) picks the least total error whose packed bytes fit
``bytes``. The chosen linears are then quantized by sequential GPTQ into those types (block
scales fitted with the importance matrix where the type takes one), so the errors that chose the
mix are RTN's, an approximation stated in the manifest. ``awq(format=gguf-q4_0) | gguf_mix(...)``
scales first (AWQ leaves the rounding to this step).

``bytes`` counts the targeted linears' GGUF blocks plus the embedding's; the command line's
``joules compress MODEL --target-size 80MB`` derives it from a whole-file size
(:func:`joules.deploy.size.size_plan`: the file's metadata, norms and untied head subtracted).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from joules import formats
from joules.compress.context import CompressContext
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.knapsack import solve
from joules.compress.steps.gptq import GPTQ
from joules.compress.steps.mixed import Mixed
from joules.compress.steps.outliers import fisher_diagonals
from joules.compress.steps.rtn import check_format
from joules.errors import ConfigError

# every type joules writes byte-exact that llama.cpp runs for linears and token embeddings
# (each with an importance-matrix search GPTQ fits its scales with, Q8_0 aside), largest
# first (ties broken toward the earlier one)
GGUF_CANDIDATES = (
    "gguf-q8_0",
    "gguf-q6_k",
    "gguf-q5_k",
    "gguf-q5_0",
    "gguf-q4_k",
    "gguf-iq4_nl",
    "gguf-q4_0",
    "gguf-iq4_xs",
    "gguf-q3_k",  # rows of 256s only; others fall back to Q4_0, as llama.cpp's do
    "gguf-q2_k",
)
EMBED = "model.embed_tokens"

# The measured options of a (model weights, calibration, candidates, targets) question, kept for
# this process: a sweep's target_size axis (or the deploy benchmark's size rows) asks it for
# several budgets, and only the knapsack and GPTQ depend on the budget. Per tensor: (name, bits
# per option, error per option, the type each option is written in).
Options = list[tuple[str, list[int], list[float], list[str]]]
_MEASURED: OrderedDict[str, Options] = OrderedDict()
_KEEP = 2  # entries (each a few kB per tensor)


def _question(ctx: CompressContext, parts: tuple[object, ...]) -> str:
    """A digest of everything the options depend on: ``parts`` (candidates, targets), the
    calibration tokens and every tensor of the model (the Fisher weights use all of them)."""
    h = hashlib.sha256(repr(parts).encode())
    calib = ctx.require_calibration("gguf_mix")
    h.update(calib.detach().cpu().contiguous().numpy().tobytes())
    for name, t in ctx.model.state_dict().items():  # the stored bytes, no fp32 copy
        h.update(f"{name}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@register_step("gguf_mix")
@dataclass(kw_only=True)
class GGUFMix(Step):
    bytes: int
    candidates: tuple[str, ...] = GGUF_CANDIDATES
    # choose the token embedding's type in the same budget (else it is not counted)
    embedding: bool = True
    damp: float = 0.01

    needs_calibration = True
    quantizes_weights = True

    def validate(self) -> None:
        if self.bytes <= 0:
            raise ConfigError(f"gguf_mix bytes={self.bytes}: give a positive byte budget")
        if len(self.candidates) < 2:
            raise ConfigError("gguf_mix needs at least two candidates, e.g. [gguf-q6_k, gguf-q4_0]")
        for c in self.candidates:
            check_format(c, "gguf_mix")
            if formats.get(c).family != "gguf":
                raise ConfigError(f"gguf_mix candidate {c!r}: use gguf-* types, e.g. gguf-q4_0")

    def _embedding(self, ctx: CompressContext) -> nn.Module | None:
        if not self.embedding:
            return None
        m = dict(ctx.model.named_modules()).get(EMBED)
        return m if isinstance(m, nn.Embedding) else None

    def _options(self, ctx: CompressContext, targets: dict[str, nn.Module]) -> Options:
        """Every targeted tensor's options: RTN into each candidate, its Fisher-weighted error
        (measured once per process for the same weights, calibration and candidates)."""
        emb = self._embedding(ctx)
        key = _question(ctx, (self.candidates, sorted(targets), emb is not None, ctx.batch_size))
        if key in _MEASURED:
            _MEASURED.move_to_end(key)
            return _MEASURED[key]
        mixed = Mixed(avg_bits=(8.0,), candidates=self.candidates, targets=self.targets)
        layers = mixed._collect(ctx, targets)  # RTN per candidate, Fisher-weighted errors
        if emb is not None:  # the same options and errors for the embedding's weight
            layers.append(
                mixed._layer(EMBED, emb, None, fisher_diagonals(ctx, {EMBED: emb})[EMBED])
            )
        out = [(lay.name, lay.costs, lay.errors, [q.spec for q in lay.qts]) for lay in layers]
        _MEASURED[key] = out
        while len(_MEASURED) > _KEEP:
            _MEASURED.popitem(last=False)
        return out

    def apply(self, ctx: CompressContext) -> None:
        targets = ctx.resolve_targets(self.targets)
        layers = self._options(ctx, targets)
        costs = [c for _, c, _, _ in layers]
        budget = self.bytes * 8
        cheapest = sum(min(c) for c in costs)
        if budget < cheapest:
            raise ConfigError(
                f"gguf_mix bytes={self.bytes}: the smallest choice of these types takes "
                f"{-(-cheapest // 8)} bytes for these tensors: raise the budget or add smaller "
                "candidates"
            )
        sol = solve(costs, [e for _, _, e, _ in layers], budget)
        choice = {n: self.candidates[k] for (n, _, _, _), k in zip(layers, sol.choice, strict=True)}
        # the type each tensor is written in: the choice, or llama.cpp's fallback for its rows
        effective = {n: sp[k] for (n, _, _, sp), k in zip(layers, sol.choice, strict=True)}
        emb_spec = choice.pop(EMBED, None)
        emb_type = effective.pop(EMBED, None)
        common = Counter(choice.values()).most_common(1)[0][0]
        over = tuple(f"{n}={s}" for n, s in choice.items() if s != common)
        gptq = GPTQ(format=common, overrides=over, damp=self.damp, targets=self.targets)
        gptq.apply(ctx)
        mix = {
            "bytes_budget": self.bytes,
            "bytes": -(-sol.cost // 8),
            "exact": sol.exact,
            "candidates": list(self.candidates),
            "types": dict(Counter(effective.values())),
            "embedding": emb_spec,
            "errors_from": "rtn (the layers are then quantized by gptq)",
            "sensitivity": "fisher",
        }
        planned = dict(ctx.manifest.gguf_export or {})
        planned["mix"] = mix
        if emb_type is not None:
            planned["embedding"] = emb_type
        ctx.manifest.gguf_export = planned
