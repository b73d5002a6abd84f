"""The shape of a decoder-only transformer, read from its config alone (no weights).

    >>> from joules.predict.shape import ModelShape
    >>> s = ModelShape.from_config({"model_type": "llama", "hidden_size": 4096,
    ...     "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
    ...     "vocab_size": 32000})
    >>> s.n_kv_heads, s.head_dim, round(s.n_params / 1e9, 2)
    (32, 128, 6.74)

``ModelShape.load(spec)`` takes whatever a MODEL argument of joules takes, without loading
weights: a ``config.json`` file, a Hugging Face directory, a compressed directory (its
``joules.json`` manifest is returned beside the shape), or ``smollm2-135m`` (the converted
copy's config, else the GGUF header). So a 70B config is predicted on a laptop.

Config keys understood: the Llama/Mistral/Qwen2/Gemma/Phi-3 names (``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``, ``vocab_size``, ``tie_word_embeddings``, ``sliding_window``,
``layer_types`` / ``max_window_layers``) and GPT-2's (``n_embd``, ``n_layer``, ``n_head``,
``n_inner``). A missing required key is a one-line :class:`~joules.errors.ConfigError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from joules.errors import ConfigError

# Families whose MLP is a plain up/down pair (2 matrices); every other family is gated (3).
_UNGATED = {
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "bloom",
    "falcon",
    "phi",
    "starcoder2",
    "gpt_bigcode",
}


@dataclass(frozen=True)
class ModelShape:
    """Everything the roofline needs about a model: sizes only, no weights.

    ``sliding_layers`` lists the layer indices that attend to at most ``sliding_window`` past
    positions (Mistral: all of them; Gemma-2/3, Qwen2 with ``use_sliding_window``: some).
    """

    name: str
    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    mlp_gated: bool = True
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for k in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model shape {self.name!r}: {k} must be > 0")
        if self.vocab <= 0:
            raise ConfigError(f"model shape {self.name!r}: vocab must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model shape {self.name!r}: {self.n_heads} heads is not a multiple of "
                f"{self.n_kv_heads} KV heads"
            )

    # -- sizes ------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp_gated else 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear of one decoder layer, by HF module name."""
        d, f = self.hidden, self.intermediate
        shapes = {
            "self_attn.q_proj": (self.q_dim, d),
            "self_attn.k_proj": (self.kv_dim, d),
            "self_attn.v_proj": (self.kv_dim, d),
            "self_attn.o_proj": (d, self.q_dim),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }
        if self.mlp_gated:
            shapes["mlp.gate_proj"] = (f, d)
        return shapes

    @property
    def params_per_layer(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden

    @property
    def n_params(self) -> int:
        """Parameters (linears, norms, embedding, and lm_head unless tied); biases ignored."""
        emb = self.vocab * self.hidden
        return (
            self.n_layers * self.params_per_layer
            + emb * (1 if self.tied_embeddings else 2)
            + (self.hidden)
        )

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and layer in self.sliding_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_layers"] = list(self.sliding_layers)
        d["n_params"] = self.n_params
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        d = {k: v for k, v in d.items() if k != "n_params"}
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        return cls(**d)

    # -- readers ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, name: str | None = None, source: str = "") -> ModelShape:
        """From a transformers ``PretrainedConfig`` or a ``config.json`` dict."""
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers
            cfg = {**cfg["text_config"], "model_type": cfg.get("model_type", "")}
        mtype = str(cfg.get("model_type", ""))
        label = name or cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or mtype

        def need(*keys: str) -> int:
            for k in keys:
                if cfg.get(k) is not None:
                    return int(cfg[k])
            raise ConfigError(
                f"config of {label!r} has none of {', '.join(keys)}: not a decoder LM?"
            )

        hidden = need("hidden_size", "n_embd", "d_model")
        layers = need("num_hidden_layers", "n_layer", "num_layers")
        heads = need("num_attention_heads", "n_head", "num_heads")
        kv = int(cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads)
        if cfg.get("multi_query"):
            kv = 1
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim")
        inter = int(inter) if inter else 4 * hidden
        vocab = need("vocab_size")
        window = cfg.get("sliding_window")
        sliding: tuple[int, ...] = ()
        if window:
            types = cfg.get("layer_types")
            if types:
                sliding = tuple(i for i, t in enumerate(types) if "sliding" in str(t))
            elif mtype.startswith("qwen2"):
                if cfg.get("use_sliding_window"):
                    start = int(cfg.get("max_window_layers") or 0)
                    sliding = tuple(range(start, layers))
            else:
                sliding = tuple(range(layers))
        return cls(
            name=str(label),
            model_type=mtype,
            n_layers=layers,
            hidden=hidden,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            intermediate=inter,
            vocab=vocab,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", mtype == "gpt2")),
            mlp_gated=mtype not in _UNGATED,
            sliding_window=int(window) if window and sliding else None,
            sliding_layers=sliding,
            source=source,
        )

    @classmethod
    def load(cls, spec: str | Path) -> tuple[ModelShape, dict[str, Any] | None]:
        """``(shape, manifest)`` of any MODEL spec, reading configs only; manifest is the
        parsed ``joules.json`` of a compressed directory, else None."""
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_file() and path.suffix == ".json":
            name = path.parent.name if path.name == "config.json" else path.stem
            return cls.from_config(_read_json(path), name=name, source=str(path)), None
        if path.is_dir() and (path / "config.json").is_file():
            manifest = None
            if (path / "joules.json").is_file():
                manifest = _read_json(path / "joules.json")
            cfg = _read_json(path / "config.json")
            return cls.from_config(cfg, name=path.name, source=str(path / "config.json")), manifest
        from joules.models.loading import converted_gguf_dir, resolve

        kind, gguf = resolve(text)  # raises the loader's one-line errors for bad specs
        if kind == "gguf":
            conv = converted_gguf_dir(gguf) / "config.json"
            if conv.is_file():
                return cls.from_config(_read_json(conv), name=text, source=str(conv)), None
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            return cls.from_config(cfg, name=text, source=str(gguf)), None
        return cls.from_config(_read_json(gguf / "config.json"), name=text, source=str(gguf)), None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
