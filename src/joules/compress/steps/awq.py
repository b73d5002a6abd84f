"""AWQ (activation-aware weight quantization, Lin et al. 2023): per-input-channel scales that
protect the weights seeing large activations, folded into the preceding op, then a clipping
search on the quantized weights.

    >>> import torch
    >>> from joules import formats
    >>> from joules.compress.steps.awq import search_scales
    >>> x = torch.randn(256, 64); x[:, :2] *= 30         # two high-norm input channels
    >>> w = torch.randn(32, 64) * 0.05
    >>> res = search_scales(x, [w], formats.get("int4-g32"), grid=10)
    >>> res.loss <= res.losses[0]                         # alpha = 0 is plain round-to-nearest
    True

As a recipe step: ``awq(format=int4-g64, grid=20, clip=true, max_tokens=8192)`` quantizes the
targeted linears to ``format`` after scaling and clipping, unless a later step quantizes them
(``awq(format=int4-g64) | gptq(format=int4-g64)``: AWQ then only scales and clips). The search
reads at most ``max_tokens`` calibration tokens (whole sequences from the start of the
calibration set), recorded per layer as ``awq_scale_tokens``.

For a group of linears sharing one input ``x`` [tokens, k] (q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``, down after up, o after v), AutoAWQ's search tries
``s = mean|x|^alpha`` (normalised by ``sqrt(max(s) * min(s))``) for ``alpha`` in
``0, 1/grid, ..., (grid-1)/grid`` and keeps the one minimising the mean squared error of the
group's outputs ``x @ (Q(W * s) / s)^T`` against ``x @ W^T`` (here the linears' own outputs, not
the whole attention/MLP module as AutoAWQ does: cheaper, and what the layer error measures).
``alpha = 0`` is round-to-nearest, so on the search tokens the chosen scales never do worse.
Both searches read the inputs only through their Gram matrix ``x^T x / T`` and ``mean|x|``
(:class:`InputStats`): a candidate costs a k x k product whatever the token count, so the
subsample (``max_tokens``) bounds only the one pass that builds the statistics.

Folding: ``W[:, c] *= s[c]`` for each linear, and the preceding op's output channel ``c`` is
divided by ``s[c]`` (an RMSNorm's weight, or a linear's row and bias), so the fp model computes
the same function (up to fp32 rounding). With grouped-query attention an o_proj input channel
``c`` (query head ``h``, dim ``d``) reads v_proj row ``j = (h // (heads / kv_heads)) * hd + d``:
one scale per v row is shared by every query head of its KV group (the statistic is the mean
over those heads), which keeps the fold exact.

Clipping (AutoAWQ's ``_search_best_clip``): per output row and weight group, the range
``[-m, m]`` with ``m = amax * (1 - i / n_grid)``, ``i < max_shrink * n_grid``, that minimises the
group's share of the output error (from the Gram matrix's diagonal block); q/k are not clipped (AutoAWQ: their
errors are amplified by the softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from joules import formats
from joules.compress.context import BlockInputs, CompressContext, install_quantized
from joules.compress.modules.linear import CompressedLinear
from joules.compress.recipe import Step, register_step, step_class
from joules.compress.steps.rtn import check_format
from joules.errors import ConfigError
from joules.formats.base import Format


@dataclass
class ScaleSearch:
    """Result of :func:`search_scales`: the chosen scales and the loss at each alpha."""

    scales: torch.Tensor  # [k] fp32, multiply weight columns, divide the previous op's outputs
    alpha: float
    loss: float  # MSE of the group's outputs at the chosen alpha
    losses: list[float] = field(default_factory=list)  # loss per alpha (losses[0]: alpha = 0)


def _fake_quant(fmt: Format, w: torch.Tensor) -> torch.Tensor:
    return fmt.fake_quant(w.float())


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AutoAWQ's candidate: ``mean|x|^alpha`` clamped at 1e-4, normalised to geometric mid 1."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class InputStats:
    """What the searches need from a linear's inputs x [T, k]: the Gram matrix ``x^T x / T``
    (so each candidate costs a k x k product, not a pass over the tokens) and ``mean|x|``."""

    gram: torch.Tensor  # [k, k] fp32
    abs_mean: torch.Tensor  # [k]
    tokens: int

    @staticmethod
    def of(x: torch.Tensor, chunk: int = 4096) -> InputStats:
        x = x.reshape(-1, x.shape[-1])
        k = x.shape[1]
        gram = torch.zeros(k, k, dtype=torch.float64)
        abs_sum = torch.zeros(k, dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk].float()
            gram += (xc.T @ xc).double()
            abs_sum += xc.abs().sum(dim=0).double()
        t = max(x.shape[0], 1)
        return InputStats((gram / t).float(), (abs_sum / t).float(), int(x.shape[0]))

    def scaled(self, s: torch.Tensor) -> InputStats:
        """Statistics of ``x / s``."""
        return InputStats(self.gram / s[:, None] / s[None, :], self.abs_mean / s, self.tokens)


def output_mse(stats: InputStats, delta: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``(x @ delta^T)^2`` per output row: ``diag(delta H delta^T)``."""
    return ((delta.float() @ stats.gram) * delta.float()).sum(dim=1)


def search_scales(
    x: torch.Tensor | InputStats,
    weights: Sequence[torch.Tensor],
    fmt: Format,
    grid: int = 20,
    expand: torch.Tensor | None = None,
) -> ScaleSearch:
    """Grid-search ``alpha`` for the linears ``weights`` ([n_i, k] each) sharing input ``x``
    (tokens [T, k], or their :class:`InputStats`).

    ``expand`` (LongTensor [k]) maps each input channel to its scale slot (GQA v->o: the v row
    it reads); the statistic of a slot is the mean over its channels. Default: identity.
    Loss: mean over tokens and output channels of the squared output error.
    """
    if grid < 1:
        raise ConfigError(f"awq grid must be >= 1, got {grid}: use e.g. grid=20")
    stats = x if isinstance(x, InputStats) else InputStats.of(x)
    x_mean = stats.abs_mean
    if expand is not None:
        slots = int(expand.max()) + 1
        per_slot = torch.zeros(slots).index_add_(0, expand, x_mean)
        per_slot /= torch.bincount(expand, minlength=slots).float()
        x_mean = per_slot
    rows = sum(w.shape[0] for w in weights)
    losses: list[float] = []
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha)
        s_k = s[expand] if expand is not None else s
        err = 0.0
        for w in weights:
            wq = _fake_quant(fmt, w.float() * s_k) / s_k
            err += float(output_mse(stats, wq - w.float()).sum())
        loss = err / rows
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s_k)
    assert best is not None
    return ScaleSearch(best[2], best[1], best[0], losses)


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide an RMSNorm's weight by ``s`` and multiply the linears' input columns by it."""
    w = getattr(norm, "weight", None)
    if w is None or w.shape != s.shape:
        raise ConfigError(
            f"awq: cannot fold scales into {type(norm).__name__} (no weight of {tuple(s.shape)})"
        )
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    w.div_(s.to(w.dtype))
    _scale_columns(linears, s)


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``prev``'s output rows (and bias) by ``s``; multiply the linears' columns by it.

    ``s`` is per input channel of ``linears``; ``prev`` has as many rows (or, for GQA v->o, use
    :func:`fold_gqa`)."""
    if prev.weight.shape[0] != s.shape[0]:
        raise ConfigError(f"awq: {prev.weight.shape[0]} rows cannot take {s.shape[0]} scales")
    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    _scale_columns(linears, s)


@torch.no_grad()
def fold_gqa(v: nn.Linear, o: nn.Linear, s_o: torch.Tensor, expand: torch.Tensor) -> None:
    """v -> o under GQA: ``s_o`` [heads * hd] is constant over the query heads of a KV group;
    v's row ``j`` is divided by the scale its channels share."""
    slots = v.weight.shape[0]
    s_v = torch.zeros(slots, dtype=s_o.dtype).index_copy_(0, expand, s_o)
    if not torch.equal(s_v[expand], s_o):
        raise ConfigError("awq: v->o scales differ within a KV group; search them with `expand`")
    v.weight.div_(s_v.to(v.weight.dtype)[:, None])
    if v.bias is not None:
        v.bias.div_(s_v.to(v.bias.dtype))
    _scale_columns([o], s_o)


def _scale_columns(linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        if lin.weight.shape[1] != s.shape[0]:
            raise ConfigError(
                f"awq: {lin.weight.shape[1]} input channels cannot take {s.shape[0]} scales"
            )
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def gqa_expand(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each o_proj input channel (head h, dim d) the v_proj row it reads: [heads * hd]."""
    if heads % kv_heads:
        raise ConfigError(f"awq: {heads} query heads do not split into {kv_heads} KV groups")
    rep = heads // kv_heads
    h = torch.arange(heads * head_dim) // head_dim
    d = torch.arange(heads * head_dim) % head_dim
    return (h // rep) * head_dim + d


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


def weight_group(fmt: Format, k: int) -> int:
    """The run of columns sharing a scale in ``fmt`` (a whole row if it has no groups)."""
    g = getattr(fmt.config, "grouping", None)
    if g is not None and g.kind == "group" and k % g.size == 0:
        return g.size
    for name in ("block_size", "block"):
        size = getattr(fmt.config, name, None)
        if isinstance(size, int) and size > 0 and k % size == 0:
            return size
    return k


@torch.no_grad()
def search_clip(
    x: torch.Tensor | InputStats,
    w: torch.Tensor,
    fmt: Format,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Best clipping range per (row, group) of ``w`` [n, k] for inputs ``x`` ([T, k] or stats).

    Returns ``max_val`` [n, k / G]; :func:`apply_clip` clamps ``w`` to ``[-max_val, max_val]``.
    Error of a group (AutoAWQ's): mean over tokens of ``(x_g @ (Q(clamp(w_g)) - w_g))^2``,
    computed from the group's diagonal block of the Gram matrix.
    """
    stats = x if isinstance(x, InputStats) else InputStats.of(x)
    n, k = w.shape
    G = weight_group(fmt, k)
    ng = k // G
    idx = torch.arange(ng)
    h = stats.gram.reshape(ng, G, ng, G)[idx, :, idx, :]  # [g, G, G] diagonal blocks
    wg = w.float().reshape(n, ng, G)
    org_max = wg.abs().amax(dim=2, keepdim=True)  # [n, g, 1]
    best_max = org_max.clone()
    best_err = torch.full(org_max.shape, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        cur = torch.maximum(torch.minimum(wg, m), -m)
        d = _fake_quant(fmt, cur.reshape(n, k)).reshape(n, ng, G) - wg
        err = torch.einsum("ngc,gcd,ngd->ng", d, h, d)[..., None]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, m, best_max)
    return best_max.squeeze(-1)


@torch.no_grad()
def apply_clip(lin: nn.Linear, max_val: torch.Tensor) -> None:
    k = lin.weight.shape[1]
    G = k // max_val.shape[1]
    m = max_val.repeat_interleave(G, dim=1).to(lin.weight.dtype)
    lin.weight.copy_(torch.maximum(torch.minimum(lin.weight, m), -m))


# --------------------------------------------------------------------------------------------
# One decoder block
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Linears sharing one input, and the op producing that input (where scales fold)."""

    prev: str
    linears: tuple[str, ...]
    kind: str  # "norm" | "linear" | "gqa"


# Llama-style blocks (Llama, Mistral, Qwen2, SmolLM2): module names inside the block.
LLAMA_PAIRS = (
    Pair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    Pair("self_attn.v_proj", ("self_attn.o_proj",), "gqa"),
    Pair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    Pair("mlp.up_proj", ("mlp.down_proj",), "linear"),
)
NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ: the softmax amplifies their errors


def _subsample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if n <= 0 or x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:n].sort().values]


def _gqa_map(block: nn.Module, v: nn.Linear, o: nn.Linear) -> torch.Tensor | None:
    """The v row each o input channel reads (None when v and o do not pair up)."""
    hd = getattr(getattr(block, "self_attn", None), "head_dim", None)
    if not isinstance(hd, int) or o.weight.shape[1] % hd or v.weight.shape[0] % hd:
        return None
    heads, kv = o.weight.shape[1] // hd, v.weight.shape[0] // hd
    if kv == 0 or heads % kv:
        return None
    return gqa_expand(heads, kv, hd)


@torch.no_grad()
def awq_block(
    block: nn.Module,
    inputs: dict[str, torch.Tensor],
    fmt: Format,
    *,
    targets: set[str],
    grid: int = 20,
    clip: bool = True,
    max_tokens: int = 8192,
    clip_tokens: int = 0,
    seed: int = 0,
    pairs: Sequence[Pair] = LLAMA_PAIRS,
) -> dict[str, dict]:
    """Search, fold and clip AWQ scales in one block, in place.

    ``inputs`` maps block-relative linear names to their fp32 inputs [tokens, k] captured
    *before* this call (the fp block's function does not change as scales fold, so one capture
    serves every pair). ``targets``: block-relative names of the linears to treat; a pair with an
    untargeted linear is skipped. Returns a record per linear (alpha, losses, tokens, clip).
    """
    gen = torch.Generator().manual_seed(seed)
    mods = dict(block.named_modules())
    records: dict[str, dict] = {}
    for pair in pairs:
        names = [n for n in pair.linears if n in mods]
        if not names or pair.prev not in mods:
            continue
        if not all(n in targets for n in names):
            for n in set(names) & targets:
                records.setdefault(n, {})["awq_scale"] = (
                    f"skipped: {pair.prev} feeds untargeted linears"
                )
            continue
        lins = [mods[n] for n in names]
        prev = mods[pair.prev]
        x_full = inputs[names[0]]
        stats = InputStats.of(_subsample(x_full, max_tokens, gen))
        expand = None
        if pair.kind == "gqa":
            expand = _gqa_map(block, prev, lins[0])
            if expand is None:
                for n in names:
                    records.setdefault(n, {})["awq_scale"] = "skipped: v/o shapes do not pair up"
                continue
        res = search_scales(stats, [lin.weight for lin in lins], fmt, grid=grid, expand=expand)
        if pair.kind == "norm":
            fold_into_norm(prev, lins, res.scales)
        elif pair.kind == "gqa":
            fold_gqa(prev, lins[0], res.scales, expand)
        else:
            fold_into_linear(prev, lins, res.scales)
        for n, lin in zip(names, lins, strict=True):
            rec = records.setdefault(n, {})
            rec.update(
                awq_alpha=res.alpha,
                awq_loss=res.loss,
                awq_rtn_loss=res.losses[0],
                awq_scale_tokens=stats.tokens,
                awq_prev=pair.prev
                + (" (one scale per KV-group channel)" if expand is not None else ""),
            )
            if clip and not n.endswith(NO_CLIP):
                cs = stats if clip_tokens <= 0 or clip_tokens >= stats.tokens else None
                cs = cs or InputStats.of(_subsample(x_full, clip_tokens, gen))
                apply_clip(lin, search_clip(cs.scaled(res.scales), lin.weight, fmt))
                rec["awq_clip_tokens"] = cs.tokens
    return records


# --------------------------------------------------------------------------------------------
# The recipe step
# --------------------------------------------------------------------------------------------


def _later_step_quantizes(ctx: CompressContext) -> bool:
    """True when a step after this one in the recipe quantizes weights (``rtn``, ``gptq``, or a
    step class with ``quantizes_weights = True``): AWQ then leaves the scaled and clipped
    weights in fp for it (each layer is quantized once)."""
    done = len(ctx.manifest.steps)  # steps already applied; this one is recipe_steps[done]
    for s in ctx.manifest.recipe_steps[done + 1 :]:
        cls = step_class(s["name"])
        if getattr(cls, "quantizes_weights", s["name"] in ("rtn", "gptq")):
            return True
    return False


@register_step("awq")
@dataclass(kw_only=True)
class AWQ(Step):
    """``awq(format, grid=20, clip=true, max_tokens=8192)``: scales searched on (at most)
    ``max_tokens`` calibration tokens (whole sequences from the start of the calibration set),
    folded into the preceding norm/linear, clipping searched on the same statistics; the layers
    are then rounded to ``format`` unless a later step quantizes them (``awq | gptq``)."""

    layered = True  # reads weights one decoder block at a time

    format: str
    grid: int = 20
    clip: bool = True
    max_tokens: int = 8192
    seed: int = 0
    # the format the scale and clip searches round with (default: ``format``). A later step
    # that quantizes (``awq | gptq``) decides the codes, so a cheaper format of the same block
    # can stand in for the search: joules' IQ4 searches run ~18x slower than Q4_0's
    # (measured: 2.9 s vs 0.16 s per 1536x576 matrix) and AWQ rounds thousands of times
    search_format: str | None = None

    needs_calibration = True
    quantizes_weights = True  # unless a later step does (see _later_step_quantizes)

    def validate(self) -> None:
        check_format(self.format, "awq")
        if self.search_format is not None:
            check_format(self.search_format, "awq")
        if self.grid < 1:
            raise ConfigError(f"awq grid={self.grid}: use a positive integer, e.g. 20")
        if self.max_tokens < 1:
            raise ConfigError(f"awq max_tokens={self.max_tokens}: use a positive count, e.g. 8192")

    def apply(self, ctx: CompressContext) -> None:
        fmt = formats.get(self.format)
        search = formats.get(self.search_format) if self.search_format else fmt
        targets = ctx.resolve_targets(self.targets)
        outside = [n for n in targets if ctx.block_of(n) is None]
        if outside:
            raise ConfigError(
                f"awq scales linears inside decoder blocks, not '{outside[0]}': quantize it "
                "with its own step, e.g. '... | rtn(format=int8-ch, targets=[lm_head])'"
            )
        done = [n for n, m in targets.items() if isinstance(m, CompressedLinear)]
        if done:
            raise ConfigError(
                f"awq needs fp weights but '{done[0]}' is already compressed: put awq first"
            )
        quantize = not _later_step_quantizes(ctx)
        by_block = ctx.by_block(targets, "awq targets decoder-block linears only, not '{name}'")

        calib = ctx.require_calibration("awq")
        n_seq = max(1, min(len(calib), -(-self.max_tokens // calib.shape[1])))

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            mods = by_block.get(i, {})
            captured = inputs.capture(block, mods)
            recs = awq_block(
                block,
                captured,
                search,
                targets=set(mods),
                grid=self.grid,
                clip=self.clip,
                max_tokens=self.max_tokens,
                seed=self.seed + i,
            )
            del captured
            for rel, m in mods.items():
                name = f"{block_name}.{rel}"
                rec = recs.get(rel) or {"awq_scale": "skipped: no preceding op known for it"}
                if quantize:
                    install_quantized(ctx, name, m, fmt.quantize(m.weight.detach().float()), "awq")
                ctx.record(name, awq_format=search.spec, **rec)

        ctx.calibration = calib[:n_seq]  # the search's subsample: whole sequences
        try:
            ctx.sequential(fn, step="awq", blocks=set(by_block))
        finally:
            ctx.calibration = calib


__all__ = [
    "AWQ",
    "LLAMA_PAIRS",
    "InputStats",
    "Pair",
    "ScaleSearch",
    "apply_clip",
    "awq_block",
    "awq_scales",
    "fold_gqa",
    "fold_into_linear",
    "fold_into_norm",
    "gqa_expand",
    "output_mse",
    "search_clip",
    "search_scales",
    "weight_group",
]
