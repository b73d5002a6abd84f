"""Tiny seeded random models for fast tests: same code paths as a real model, in milliseconds.

    >>> from joules.models import tiny_model
    >>> model, tokenizer, info = tiny_model("llama", seed=0)
    >>> info.layers, info.vocab_size
    (2, 384)
    >>> tiny_model("llama", seed=0).model.state_dict()["lm_head.weight"].shape
    torch.Size([384, 64])

The tokenizer is byte-level (every UTF-8 byte is a token, plus BOS/EOS/PAD), built locally with
the ``tokenizers`` library, so any text round-trips and nothing is downloaded.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from joules.errors import ConfigError
from joules.models.info import describe
from joules.models.loading import LoadedModel

_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
TINY_ARCHS = tuple(_ARCHS)


def byte_tokenizer(vocab_size: int | None = None) -> Any:
    """A byte-level fast tokenizer: ids 0-2 are <pad>, <s>, </s>; ids 3-258 are the bytes.

    ``vocab_size``: fill the vocabulary to exactly this many tokens with BPE merges (every pair
    of byte symbols, then pairs with a third byte), so a synthetic checkpoint's tokenizer has
    its embedding's rows and real merges (llama.cpp requires merges for a gpt2 vocabulary).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ConfigError(f"a byte tokenizer needs {len(vocab)} tokens, got {vocab_size}")
        symbols = sorted(alphabet)
        pairs = ((a, b) for a in symbols for b in symbols)
        triples = ((a + b, c) for a in symbols for b in symbols for c in symbols)
        for left, right in itertools.chain(pairs, triples):
            if len(vocab) >= vocab_size:
                break
            merges.append((left, right))
            vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    *,
    vocab_size: int = 384,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Build a seeded random causal LM of ``arch`` from a config (deterministic for a seed).

    ``vocab_size`` must be at least 259 (3 special tokens + 256 bytes); larger values leave
    unused rows, which keeps matrix shapes multiples of 32 for group-wise formats.
    """
    if arch not in _ARCHS:
        raise ConfigError(f"unknown tiny architecture {arch!r}: choose one of {', '.join(_ARCHS)}")
    if vocab_size < 259:
        raise ConfigError(
            f"tiny_model vocab_size must be >= 259 (bytes + specials), got {vocab_size}"
        )
    import transformers

    cfg_name, model_name = _ARCHS[arch]
    extra: dict[str, Any] = {}
    if arch == "gemma3":
        # head_dim and the query scale as llama.cpp's gemma3 graph assumes them (1/sqrt(head_dim));
        # layers alternate sliding-window and full attention, a window shorter than a test's
        head_dim = hidden_size // heads
        extra = dict(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=32,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        )
    config = getattr(transformers, cfg_name)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    # Seed a private generator state so that building a tiny model never disturbs the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model = model.to(dtype).eval()
    tokenizer = byte_tokenizer()
    info = describe(model, f"tiny-{arch}-seed{seed}", "<memory>")
    return LoadedModel(model, tokenizer, info)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **kwargs: Any) -> Path:
    """Write a tiny model as a Hugging Face directory that ``load_model(path)`` accepts."""
    path = Path(path)
    model, tokenizer, _ = tiny_model(arch, seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
