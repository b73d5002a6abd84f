"""Reading GGUF files: tensor types and the map from GGUF tensor names to Hugging Face names.

    >>> from joules.models.gguf import gguf_tensor_types
    >>> types = gguf_tensor_types("model.gguf")                      # doctest: +SKIP
    >>> types["model.layers.0.self_attn.q_proj.weight"]               # doctest: +SKIP
    'Q4_1'

transformers dequantizes GGUF weights to float when it loads them; this module keeps the record
of what they were stored as, so that reports can say that e.g. SmolLM2's weights were Q4_1.
"""

from __future__ import annotations

import re
from pathlib import Path

from joules.errors import UnsupportedModelError

# GGUF block names (llama.cpp convention) -> Hugging Face module names of llama-family models.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face parameter name (unknown names pass through)."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        return gguf_name
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    return gguf_name


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Return ``{hf_param_name: gguf_type_name}`` for every tensor in a GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise UnsupportedModelError("reading GGUF files needs the 'gguf' package") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file ({exc})") from exc
    return {hf_name(t.name): t.tensor_type.name for t in reader.tensors}
