"""``heads(method=chai, keep=...)``: cluster attention heads whose score patterns are alike.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()                      # 4 query heads, 2 KV heads
    >>> calib, _ = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "heads(keep=3)", calibration=calib)
    >>> cm.manifest.layers["model.layers.0.self_attn"]["score_patterns"]
    3

After CHAI (Agarwal et al., 2024): heads of one layer whose attention probabilities correlate on
calibration text are clustered, and each cluster computes one score pattern — every member's
query projection becomes the representative's, so ``softmax(QK^T)`` is the same for all of them;
values and the output projection stay per head. With grouped-query attention (SmolLM2: 9 query
heads share 3 KV heads) scores can be shared only between heads that also share their keys:
clusters form inside a KV group, and two clusters of different groups merge only when each is a
*whole* group, in which case those groups share one key projection too and the K cache of all but
one of them becomes redundant. Agglomerative clustering (average linkage on 1 - correlation)
merges the most alike allowed pair until ``keep`` score patterns remain per layer, or (with
``min_similarity``) until no allowed pair correlates that much — a per-layer count, as CHAI sizes
its clusters per layer; ``first_layer`` leaves the layers before it whole.

What it saves is reported per layer (``score_flops_saving``, ``k_cache_saving``) as the saving a
kernel that computes shared scores once would realise: here the weights are duplicated rows and
the model runs as before (no such kernel on this CPU). Membership is fixed from calibration data,
whereas CHAI decides it per request after the first layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from joules.compress.context import BlockInputs, CompressContext
from joules.compress.modules.linear import CompressedLinear
from joules.compress.recipe import Step, register_step
from joules.errors import ConfigError


def head_correlation(probs: torch.Tensor) -> torch.Tensor:
    """``[H, H]`` mean Pearson correlation of heads' causal attention maps ``probs [B, H, L, L]``."""
    length = probs.shape[-1]
    tril = torch.tril(torch.ones(length, length, dtype=torch.bool))
    x = probs[..., tril].double()  # [B, H, n]
    x = x - x.mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bin,bjn->bij", x, x).mean(0).float()


def cluster_heads(
    corr: torch.Tensor,
    group_of: list[int],
    keep: int,
    min_similarity: float = -1.0,
    merges: list[float] | None = None,
) -> list[list[int]]:
    """Average-linkage clusters of heads under the GQA rule (see module doc): merge the most alike
    allowed pair while more than ``keep`` clusters remain and that pair's mean correlation is at
    least ``min_similarity``; each merge's correlation is appended to ``merges`` if given."""
    h = corr.shape[0]
    members_of_group: dict[int, set[int]] = {}
    for i, g in enumerate(group_of):
        members_of_group.setdefault(g, set()).add(i)
    clusters = [[i] for i in range(h)]

    def groups(c: list[int]) -> set[int]:
        return {group_of[i] for i in c}

    def whole(c: list[int]) -> bool:
        return set(c) == set().union(*(members_of_group[g] for g in groups(c)))

    while len(clusters) > keep:
        best, pair = -2.0, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                ca, cb = clusters[a], clusters[b]
                if groups(ca) != groups(cb) and not (whole(ca) and whole(cb)):
                    continue
                sim = float(corr[ca][:, cb].mean())
                if sim > best:
                    best, pair = sim, (a, b)
        if pair is None or best < min_similarity:
            break  # no allowed merge left, or none alike enough
        if merges is not None:
            merges.append(best)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return clusters


def _attention_probs(attn: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Causal attention probabilities ``[B, H, L, L]`` of a llama-style attention on input x."""
    mod = sys.modules[type(attn).__module__]
    rope = getattr(mod, "apply_rotary_pos_emb", None)
    hd = attn.head_dim
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, hd).transpose(1, 2)
    cos, sin = kw["position_embeddings"]
    q, k = rope(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@register_step("heads")
@dataclass(kw_only=True)
class Heads(Step):
    method: str = "chai"
    keep: int = 6
    max_sequences: int = 16
    # A per-layer, data-driven reduction: merge only heads whose score patterns correlate at
    # least this much (``keep`` is then a floor), as CHAI sizes its clusters per layer.
    min_similarity: float = -1.0
    first_layer: int = 0  # layers before it stay whole

    needs_calibration = True

    def validate(self) -> None:
        if self.method != "chai":
            raise ConfigError(f"heads method={self.method}: the only method is chai")
        if self.keep < 1:
            raise ConfigError(f"heads keep={self.keep}: keep at least 1 score pattern per layer")
        if self.max_sequences < 1:
            raise ConfigError(f"heads max_sequences={self.max_sequences}: use a positive integer")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(
                f"heads min_similarity={self.min_similarity}: a correlation in [-1, 1], e.g. 0.9"
            )
        if self.first_layer < 0:
            raise ConfigError(f"heads first_layer={self.first_layer}: use 0 or more")

    def apply(self, ctx: CompressContext) -> None:
        heads = getattr(ctx.model.config, "num_attention_heads", 0)
        if self.keep > heads:
            raise ConfigError(f"heads keep={self.keep}: the model has only {heads} heads per layer")

        def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
            attn = getattr(block, "self_attn", None)
            if attn is None or not hasattr(attn, "q_proj") or hasattr(attn, "q_norm"):
                raise ConfigError(
                    f"heads(chai) supports llama-style attention (q/k/v/o projections, RoPE): "
                    f"'{block_name}' has {type(attn).__name__}"
                )
            for p in (attn.q_proj, attn.k_proj):
                if isinstance(p, CompressedLinear):
                    raise ConfigError("put heads(...) before quantization steps in the recipe")
            xs: list[torch.Tensor] = []
            budget = self.max_sequences
            with torch.no_grad():
                for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
                    if budget <= 0:
                        break
                    x = block.input_layernorm(h[:budget])
                    kw2 = dict(kw)
                    pe = kw2["position_embeddings"]
                    kw2["position_embeddings"] = tuple(
                        t[: x.shape[0]] if t.shape[0] > 1 else t for t in pe
                    )
                    xs.append(_attention_probs(attn, x, kw2))
                    budget -= x.shape[0]
            probs = torch.cat(xs)
            corr = head_correlation(probs)
            n_heads = probs.shape[1]
            groups = attn.num_key_value_groups
            group_of = [j // groups for j in range(n_heads)]
            merges: list[float] = []
            floor = self.keep if i >= self.first_layer else n_heads
            clusters = cluster_heads(corr, group_of, floor, self.min_similarity, merges)
            self._merge(attn, clusters, group_of, attn.head_dim)
            kv_heads = n_heads // groups
            # A cluster spanning several KV groups makes all of them share one key head.
            k_heads = kv_heads - sum(len({group_of[j] for j in c}) - 1 for c in clusters)
            ctx.record(
                f"{block_name}.self_attn",
                method="heads-chai",
                clusters=clusters,
                score_patterns=len(clusters),
                merge_similarities=[round(m, 4) for m in merges],
                score_flops_saving=1 - len(clusters) / n_heads,
                k_heads=k_heads,
                k_cache_saving=1 - k_heads / kv_heads,
                membership="fixed from calibration (CHAI decides it per request)",
            )

        layers = len(ctx.layers)
        if self.first_layer >= layers:
            raise ConfigError(
                f"heads first_layer={self.first_layer}: the model has {layers} layers (0-{layers - 1})"
            )
        ctx.sequential(fn, step="heads")
        ctx.manifest.notes.append(
            "heads(chai): savings are what a kernel computing shared scores once would realise; "
            "the model here runs with duplicated query/key rows"
        )

    @staticmethod
    def _merge(attn: nn.Module, clusters: list[list[int]], group_of: list[int], hd: int) -> None:
        """Copy the representative's query rows to every member (and its key rows to every KV
        group of a multi-group cluster)."""
        with torch.no_grad():
            for c in clusters:
                rep = c[0]
                for j in c[1:]:
                    attn.q_proj.weight[j * hd : (j + 1) * hd] = attn.q_proj.weight[
                        rep * hd : (rep + 1) * hd
                    ]
                    if attn.q_proj.bias is not None:
                        attn.q_proj.bias[j * hd : (j + 1) * hd] = attn.q_proj.bias[
                            rep * hd : (rep + 1) * hd
                        ]
                g_rep = group_of[rep]
                for g in sorted({group_of[j] for j in c} - {g_rep}):
                    attn.k_proj.weight[g * hd : (g + 1) * hd] = attn.k_proj.weight[
                        g_rep * hd : (g_rep + 1) * hd
                    ]
                    if attn.k_proj.bias is not None:
                        attn.k_proj.bias[g * hd : (g + 1) * hd] = attn.k_proj.bias[
                            g_rep * hd : (g_rep + 1) * hd
                        ]
