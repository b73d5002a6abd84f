"""Models: load any accepted spec, describe it, and build tiny random models for tests.

>>> from joules.models import load_model, tiny_model
>>> model, tokenizer, info = load_model("smollm2-135m")   # doctest: +SKIP
>>> model, tokenizer, info = tiny_model("llama", seed=0)
"""

from joules.models.info import ModelInfo, describe
from joules.models.loading import (
    ACCEPTED,
    DEFAULT_MODEL,
    LoadedModel,
    cache_dir,
    load_model,
    resolve,
    smollm2_gguf_path,
)
from joules.models.tiny import TINY_ARCHS, byte_tokenizer, save_tiny_model, tiny_model

__all__ = [
    "ACCEPTED",
    "DEFAULT_MODEL",
    "TINY_ARCHS",
    "LoadedModel",
    "ModelInfo",
    "byte_tokenizer",
    "cache_dir",
    "describe",
    "load_model",
    "resolve",
    "save_tiny_model",
    "smollm2_gguf_path",
    "tiny_model",
]
