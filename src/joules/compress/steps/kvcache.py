"""``kvcache(...)``: a KV-cache policy recorded in the manifest and installed on the model.

    >>> import torch
    >>> from joules.models import tiny_model
    >>> from joules.compress import compress
    >>> from joules.models.hf_cache import output_cache
    >>> model, tok, _ = tiny_model()
    >>> cm = compress(model, "kvcache(format=int4, residual=32, group=32)")
    >>> cm.manifest.runtime["kv_cache"]["policy"]
    'full'
    >>> out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    >>> type(output_cache(out)).__name__
    'JoulesKVCache'

How it is used: the step stores its settings in ``manifest.runtime["kv_cache"]`` and installs a
forward pre-hook on the model's decoder, ``model.model`` (re-installed by ``load_model(DIR)``
through the ``kv_cache`` runtime hook). Whenever the decoder runs with ``use_cache`` on and no
cache, or with an *empty* plain ``DynamicCache`` (what ``generate`` creates), the hook
substitutes a :class:`JoulesKVCache`; ``generate`` then carries that cache from step to step, so
``generate``, ``joules bench`` and the evaluator use it unchanged. A cache passed explicitly
(any other class, or one already holding tokens) is left alone.

Policies (one :class:`JoulesKVLayer` per decoder layer):

- ``full``: keep every token. With ``format="none"`` it is bit-identical to ``DynamicCache``.
- quantization (any ``format`` of the lab), after KIVI (Liu et al., 2024): with
  ``granularity="kivi"`` keys are quantized per channel over groups of ``group`` tokens and
  values per token; ``granularity="token"`` quantizes both per token. The newest ``residual``
  tokens always stay in full precision; a group of ``group`` tokens is quantized once it leaves
  that window. A format with one scale per tensor (``int4``) is used per row (``int4-ch``): one
  scale per KIVI group. **Emulated**: quantized tokens are stored fake-quantized in the model's
  dtype (``formats.get(spec).fake_quant``); ``kv_bytes_per_token`` is what packed storage of
  those formats would take (codes + scales), not what this process holds.
- ``sinks`` (StreamingLLM, Xiao et al., 2024): the first ``n_sinks`` tokens plus the last
  ``window``. Keys are cached *after* RoPE (transformers applies it before ``cache.update``) and
  the model keeps absolute positions (``get_seq_length`` counts every token seen, as
  ``generate`` does); when tokens are evicted the sink keys are **re-rotated** forward by the
  number evicted so they sit right before the window, which makes every query-key distance the
  one StreamingLLM's in-cache positions give. Sinks stay in full precision. RoPE of the
  Llama form (``rotate_half``, the model's ``rotary_emb``) is assumed.
- ``heavy_hitters`` (H2O, Zhang et al., 2023): an attention function registered with
  transformers' ``AttentionInterface`` as ``joules_h2o`` (eager math: softmax probabilities)
  hands each layer's probabilities to its cache layer, which accumulates per (KV head, token)
  the attention received (summed over queries and the query heads of the group) and, after the
  step, keeps ``budget`` tokens per head: the newest ``window`` (H2O's recent window; default
  ``budget // 2``) plus the most-attended of the rest. Heads keep different tokens; keys keep
  their original rotation (no re-rotation, as H2O).

A prompt longer than the budget is attended in full during prefill, then evicted down. Left
padding is not supported with ``sinks``/``heavy_hitters`` (mask offsets assume one stream).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from joules import formats
from joules.compress.api import register_runtime_hook
from joules.compress.recipe import Step, register_step
from joules.errors import ConfigError
from joules.models.hf_cache import cache_kwarg, given_cache, output_cache

_POLICIES = ("full", "sinks", "heavy_hitters")
_PENDING = threading.local()  # the layer whose attention probabilities the next call observes


def _row_format(spec: str) -> Any:
    """The lab format for ``spec``, used per row (``-ch``) when ``spec`` has one scale per tensor."""
    fmt = formats.get(spec)
    grouping = getattr(fmt.config, "grouping", None)
    if grouping is not None and grouping.kind == "tensor":
        with contextlib.suppress(ConfigError):
            fmt = formats.get(f"{spec}-ch")
    return fmt


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVSettings:
    """The runtime settings one cache is built from (``manifest.runtime["kv_cache"]``)."""

    format: str = "none"
    granularity: str = "kivi"
    residual: int = 128
    group: int = 32
    policy: str = "full"
    window: int = 0
    n_sinks: int = 4
    budget: int = 0

    @property
    def quantized(self) -> bool:
        return self.format not in ("none", "", "fp")

    @property
    def recent(self) -> int:
        """Heavy hitters: newest tokens always kept."""
        return self.window if self.window > 0 else self.budget // 2


class JoulesKVLayer(DynamicLayer):
    """One decoder layer's cache: emulated KIVI quantization plus an eviction policy."""

    def __init__(self, s: KVSettings, rotate: Any = None) -> None:
        super().__init__()
        self.s = s
        self.rotate = rotate  # fn(keys, delta:int) -> keys rotated by delta positions
        self.cumulative_length = 0
        self.n_quant = 0  # leading stored tokens (after sinks) that are already fake-quantized
        self.scores: torch.Tensor | None = None  # heavy hitters: [B, H, T] accumulated attention
        self.sink_shift = 0  # sinks: positions the sink keys were rotated forward by
        if s.quantized:
            self.key_fmt = _row_format(s.format)
            self.value_fmt = self.key_fmt

    # -- transformers' layer API -----------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self.cumulative_length += q
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        if self.s.policy == "heavy_hitters":
            pad = keys.new_zeros(keys.shape[0], keys.shape[1], q, dtype=torch.float32)
            self.scores = pad if self.scores is None else torch.cat([self.scores, pad], dim=-1)
            if getattr(_PENDING, "layer", None) is not None:
                _PENDING.layer = None
                raise ConfigError(
                    "kvcache(policy=heavy_hitters) saw no attention probabilities: run the model "
                    "with attn_implementation 'joules_h2o' (load_model sets it)"
                )
            _PENDING.layer = self  # the attention call right after this observes and evicts
        elif self.s.policy == "sinks":
            self._evict_sinks()
        if self.s.quantized:
            self._quantize_old()
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def held(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.cumulative_length - held

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = self.n_quant = self.sink_shift = 0
        self.scores = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.scores is not None:
            self.scores = self.scores.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.scores is not None:
            self.scores = self.scores[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.scores is not None:
            self.scores = self.scores.index_select(0, beam_idx.to(self.scores.device))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a joules KV cache cannot be cropped (no assisted decoding)")

    # -- quantization ----------------------------------------------------------------------------
    def _protected(self) -> int:
        return self.s.n_sinks if self.s.policy == "sinks" else 0

    def _quantize_old(self) -> None:
        s = self.s
        start = self._protected() + self.n_quant
        tail = self.keys.shape[-2] - start
        n = max(0, (tail - s.residual) // s.group) * s.group
        if n <= 0 or self.s.policy == "heavy_hitters":
            return
        k = self.keys[..., start : start + n, :]
        v = self.values[..., start : start + n, :]
        self.keys = torch.cat(
            [self.keys[..., :start, :], self._fq_keys(k), self.keys[..., start + n :, :]], dim=-2
        )
        self.values = torch.cat(
            [self.values[..., :start, :], self._fq_values(v), self.values[..., start + n :, :]],
            dim=-2,
        )
        self.n_quant += n

    def _fq_keys(self, k: torch.Tensor) -> torch.Tensor:
        b, h, t, d = k.shape
        if self.s.granularity == "token":
            return self._fq_values(k)
        g = self.s.group  # t is a multiple of group: rows = one channel over `group` tokens
        rows = k.reshape(b, h, t // g, g, d).transpose(-1, -2).reshape(-1, g)
        out = self.key_fmt.fake_quant(rows).to(k.dtype)
        return out.reshape(b, h, t // g, d, g).transpose(-1, -2).reshape(b, h, t, d)

    def _fq_values(self, v: torch.Tensor) -> torch.Tensor:
        rows = v.reshape(-1, v.shape[-1])
        return self.value_fmt.fake_quant(rows).to(v.dtype).reshape(v.shape)

    # -- eviction --------------------------------------------------------------------------------
    def _evict_sinks(self) -> None:
        s = self.s
        extra = self.keys.shape[-2] - (s.n_sinks + s.window)
        if extra <= 0:
            return
        sinks_k, sinks_v = self.keys[..., : s.n_sinks, :], self.values[..., : s.n_sinks, :]
        if self.rotate is None:
            raise ConfigError("kvcache(policy=sinks) needs the model's rotary embedding")
        sinks_k = self.rotate(sinks_k, extra)
        self.sink_shift += extra
        self.keys = torch.cat([sinks_k, self.keys[..., s.n_sinks + extra :, :]], dim=-2)
        self.values = torch.cat([sinks_v, self.values[..., s.n_sinks + extra :, :]], dim=-2)
        self.n_quant = max(0, self.n_quant - extra)

    def observe(self, probs: torch.Tensor) -> None:
        """Heavy hitters: add ``probs [B, Hq, q, kv]`` to the per-token totals, then evict."""
        if getattr(_PENDING, "layer", None) is self:
            _PENDING.layer = None
        b, hq, _, kv = probs.shape
        h = self.keys.shape[1]
        per_kv = probs.float().sum(2).reshape(b, h, hq // h, kv).sum(2)
        self.scores = self.scores + per_kv
        self.evict_heavy()

    def evict_heavy(self) -> None:
        s = self.s
        t = self.keys.shape[-2]
        if t <= s.budget:
            return
        recent = min(s.recent, s.budget)
        old = t - recent
        n_keep_old = s.budget - recent
        top = self.scores[..., :old].topk(n_keep_old, dim=-1).indices.sort(-1).values
        idx = torch.cat(
            [top, torch.arange(old, t, device=top.device).expand(*top.shape[:2], recent)], -1
        )
        d = self.keys.shape[-1]
        gidx = idx.unsqueeze(-1).expand(-1, -1, -1, d)
        self.keys = self.keys.gather(2, gidx)
        self.values = self.values.gather(2, gidx)
        self.scores = self.scores.gather(2, idx)

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> float:
        """Bytes this layer would take in packed storage (quantized part at the format's cost)."""
        if self.held() == 0:
            return 0.0
        b, h, t, d = self.keys.shape
        full = (t - self.n_quant) * b * h * d * 2 * self.keys.element_size()
        if self.n_quant == 0:
            return float(full)
        return full + self.n_quant * b * h * _quant_bytes_per_token_head(self.s, d)


def _quant_bytes_per_token_head(s: KVSettings, head_dim: int) -> float:
    fmt = _row_format(s.format)
    v_bits = fmt.total_bits((1, head_dim))
    # KIVI keys: one row per channel over `group` tokens; per-token rows otherwise
    k_bits = v_bits if s.granularity == "token" else fmt.total_bits((head_dim, s.group)) / s.group
    return (k_bits + v_bits) / 8


def kv_bytes_per_token(s: KVSettings, config: Any) -> float:
    """Bytes per token of one sequence's KV (all layers) once quantized; the fp16 cost if not."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per = _quant_bytes_per_token_head(s, head_dim) if s.quantized else 2 * 2 * head_dim
    return per * kv_heads * config.num_hidden_layers


class JoulesKVCache(Cache):
    """A transformers ``Cache`` of :class:`JoulesKVLayer` (see the module doc)."""

    def __init__(self, settings: KVSettings, config: Any, rotate: Any = None) -> None:
        n = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[JoulesKVLayer(settings, rotate) for _ in range(n)])
        self.settings = settings

    def nbytes(self) -> float:
        return sum(layer.nbytes() for layer in self.layers)

    def held(self) -> int:
        return self.layers[0].held() if self.layers else 0


# -- attention function for heavy hitters ---------------------------------------------------------


def h2o_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that hands its probabilities to the cache layer updated just before."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    layer = getattr(_PENDING, "layer", None)
    if layer is not None:
        _PENDING.layer = None
        layer.observe(probs)
    return out, probs


AttentionInterface.register("joules_h2o", h2o_attention)


# -- installation ---------------------------------------------------------------------------------


def _rotator(model: nn.Module) -> Any:
    rope = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rope is None:
        return None

    def rotate(keys: torch.Tensor, delta: int) -> torch.Tensor:
        pos = torch.full((1, 1), delta, dtype=torch.long, device=keys.device)
        cos, sin = rope(keys.float(), position_ids=pos)  # [1, 1, d]
        k = keys.float()
        return (k * cos[:, None] + _rotate_half(k) * sin[:, None]).to(keys.dtype)

    return rotate


def install_kv_cache(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Make ``model`` build a :class:`JoulesKVCache` whenever it would start a fresh cache.

    Fails loudly, never silently: installing raises :class:`UnsupportedModelError` when the
    decoder's ``forward`` takes no cache argument, and a forward that ran with ``use_cache`` but
    returned another cache than the one the hook gave it (a transformers release that builds its
    cache where the hook cannot see it) raises :class:`KVCacheBypassedError`.
    """
    fields = KVSettings.__dataclass_fields__
    settings = KVSettings(**{k: v for k, v in cfg.items() if k in fields})
    rotate = _rotator(model)
    for old in getattr(model, "_joules_kv_hook", ()) or ():
        old.remove()
    if settings.policy == "heavy_hitters":
        model.set_attn_implementation("joules_h2o")
    # On the decoder (``model.model``) when there is one: the LM head's forward passes its cache
    # down, and callers that run the decoder alone (the evaluator's hidden states) get it too.
    target = model.get_decoder() if hasattr(model, "get_decoder") else model
    target = target if isinstance(target, nn.Module) else model
    accepted = cache_kwarg(target)  # raises when the decoder takes no cache at all
    given: list[Any] = []  # the cache the pre-hook handed to the forward that is running

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(mod.config, "use_cache", True)
        name, past = given_cache(kwargs)
        fresh = past is None or (type(past) is DynamicCache and past.get_seq_length() == 0)
        if use_cache and fresh:
            past = JoulesKVCache(settings, mod.config, rotate)
            kwargs[name or accepted] = past
            kwargs["use_cache"] = True
        given.append(past if isinstance(past, JoulesKVCache) else None)
        return args, kwargs

    def post_hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        mine = given.pop() if given else None
        if mine is None:
            return
        used = output_cache(out)
        if used is not mine:
            raise KVCacheBypassedError(
                f"the kv_cache policy was installed on {type(mod).__name__} but its forward "
                f"returned a {type(used).__name__}, not the JoulesKVCache it was given: this "
                "transformers release passes the cache another way; pin the locked transformers "
                "(make install) or report it"
            )

    model._joules_kv_hook = (
        target.register_forward_pre_hook(pre_hook, with_kwargs=True),
        target.register_forward_hook(post_hook, with_kwargs=True),
    )
    model._joules_kv_settings = settings


class KVCacheBypassedError(RuntimeError):
    """A forward ran past the installed KV-cache policy (its figures would be an fp16 cache's)."""


register_runtime_hook("kv_cache")(install_kv_cache)


@register_step("kvcache")
@dataclass(kw_only=True)
class KVCacheStep(Step):
    """Install a quantized and/or evicting KV cache (see the module doc)."""

    layered = True  # a runtime setting: reads no weight

    format: str = "none"
    granularity: Literal["kivi", "token"] = "kivi"
    residual: int = 128
    group: int = 32
    policy: Literal["full", "sinks", "heavy_hitters"] = "full"
    window: int = 0
    n_sinks: int = 4
    budget: int = 0

    def validate(self) -> None:
        if self.format not in ("none", "", "fp"):
            _row_format(self.format)  # raises a one-line ConfigError for unknown specs
        if self.granularity not in ("kivi", "token"):
            raise ConfigError(
                f"kvcache: granularity '{self.granularity}' is unknown: use kivi or token"
            )
        if self.policy not in _POLICIES:
            raise ConfigError(
                f"kvcache: policy '{self.policy}' is unknown: use {', '.join(_POLICIES)}"
            )
        if self.residual < 0:
            raise ConfigError(f"kvcache: residual={self.residual} must be >= 0 (tokens)")
        if self.group < 1:
            raise ConfigError(f"kvcache: group={self.group} must be >= 1 (tokens per key group)")
        if self.window < 0 or self.n_sinks < 0 or self.budget < 0:
            raise ConfigError("kvcache: window, n_sinks and budget must be >= 0")
        if self.policy == "sinks" and self.window < 1:
            raise ConfigError("kvcache(policy=sinks) needs window >= 1, e.g. window=256")
        if self.policy == "heavy_hitters":
            if self.budget < 1:
                raise ConfigError("kvcache(policy=heavy_hitters) needs budget >= 1, e.g. 512")
            if self.window > self.budget:
                raise ConfigError(
                    f"kvcache: window={self.window} (recent tokens) exceeds budget={self.budget}"
                )
            if self.format not in ("none", "", "fp"):
                raise ConfigError(
                    "kvcache(policy=heavy_hitters) does not combine with a format yet: "
                    "use format=none"
                )
        elif self.budget:
            raise ConfigError("kvcache: budget applies to policy=heavy_hitters only")

    def settings(self) -> KVSettings:
        return KVSettings(**{f.name: getattr(self, f.name) for f in fields(KVSettings)})

    def apply(self, ctx: Any) -> None:
        self.validate()
        s = self.settings()
        cfg: dict[str, Any] = dict(s.__dict__)
        cfg["kv_bytes_per_token"] = kv_bytes_per_token(s, ctx.model.config)
        cfg["emulated"] = s.quantized
        ctx.manifest.runtime["kv_cache"] = cfg
        install_kv_cache(ctx.model, cfg)
