"""`ModelInfo`: what a loaded model is, in plain values.

>>> from joules.models import load_model
>>> model, tok, info = load_model("smollm2-135m")           # doctest: +SKIP
>>> info.layers, info.hidden_size, info.gguf_type_counts    # doctest: +SKIP
(30, 576, {'Q4_1': 210, 'F32': 61, 'Q8_0': 1})
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from joules import dtypes

# config.json key of a random-weight checkpoint (joules.models.synthetic); a compressed copy's
# config keeps it, and every result built from such a model carries SYNTHETIC_LABEL.
MARKER_KEY = "joules_synthetic"
SYNTHETIC_LABEL = "synthetic weights: quality figures are meaningless"


def synthetic_label(config: Any) -> str | None:
    """:data:`SYNTHETIC_LABEL` if ``config`` (a transformers config or a dict) is synthetic."""
    marker = (
        config.get(MARKER_KEY) if isinstance(config, dict) else getattr(config, MARKER_KEY, None)
    )
    return SYNTHETIC_LABEL if marker else None


@dataclass(frozen=True)
class ModelInfo:
    """Shape and provenance of a model, as reported by every command that loads one.

    ``gguf_types`` maps each Hugging Face parameter name to the GGUF tensor type it was stored
    in (``Q4_1``, ``Q8_0``, ``F32``...) when the model came from a GGUF file; such weights were
    already quantized before joules saw them, and reports must say so.
    """

    spec: str
    source: str
    architecture: str
    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool
    dtype: str
    bytes: int
    gguf_file: str | None = None
    gguf_types: dict[str, str] = field(default_factory=dict)
    # A joules-compressed directory: its manifest summary (recipe, bits/weight, formats...).
    compression: dict[str, Any] | None = None
    # SYNTHETIC_LABEL when the weights are random (joules.models.synthetic), else None
    synthetic: str | None = None

    @property
    def gguf_type_counts(self) -> dict[str, int]:
        """How many tensors of each GGUF type the source file held (empty if not GGUF)."""
        return dict(Counter(self.gguf_types.values()))

    @property
    def prequantized(self) -> str | None:
        """The quantized GGUF type of the linear weights (e.g. ``Q4_1``), or None."""
        if self.compression and self.compression.get("prequantized"):
            return str(self.compression["prequantized"])
        kinds = Counter(
            t for name, t in self.gguf_types.items() if name.endswith("_proj.weight")
        ).most_common(1)
        if kinds and kinds[0][0] not in {"F32", "F16", "BF16"}:
            return kinds[0][0]
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gguf_type_counts"] = self.gguf_type_counts
        d["prequantized"] = self.prequantized
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """Inverse of :meth:`to_dict` (the derived ``gguf_type_counts``/``prequantized`` are
        recomputed, not read back)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def describe(
    model: torch.nn.Module,
    spec: str,
    source: str,
    gguf_file: str | None = None,
    gguf_types: dict[str, str] | None = None,
    compression: dict[str, Any] | None = None,
) -> ModelInfo:
    """Build the :class:`ModelInfo` of a loaded Hugging Face causal LM."""
    cfg = model.config
    # Tied embeddings share storage: count each tensor once, as the model card does.
    seen: set[int] = set()
    n_params = n_bytes = 0
    for p in model.parameters():
        key = id(p) if p.is_meta else p.data_ptr()  # a layer-by-layer skeleton's blocks are meta
        if key in seen:
            continue
        seen.add(key)
        n_params += p.numel()
        n_bytes += p.numel() * p.element_size()
    for b in model.buffers():
        n_bytes += b.numel() * b.element_size()
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    return ModelInfo(
        spec=spec,
        source=source,
        architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        model_type=str(getattr(cfg, "model_type", "unknown")),
        parameters=n_params,
        layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        hidden_size=hidden,
        intermediate_size=int(getattr(cfg, "intermediate_size", 0) or 0),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", heads) or heads),
        head_dim=head_dim,
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 0) or 0),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        dtype=dtypes.torch_name(next(model.parameters()).dtype),
        bytes=n_bytes,
        gguf_file=gguf_file,
        gguf_types=dict(gguf_types or {}),
        compression=compression,
        synthetic=synthetic_label(cfg),
    )
