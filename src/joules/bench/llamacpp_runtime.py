"""The ``llamacpp`` bench runtime: greedy generation of a GGUF file by llama.cpp itself.

    >>> from joules.bench import BenchConfig, run_bench
    >>> from joules.models.loading import load_gguf_meta
    >>> lm = load_gguf_meta("out.gguf")                                    # doctest: +SKIP
    >>> cfg = BenchConfig(runtime="llamacpp", prompt_lens=(128,), gen_len=64)
    >>> run_bench("out.gguf", lm.tokenizer, lm.info, cfg).linear_paths      # doctest: +SKIP
    {'llamacpp:Q4_0': 210, 'llamacpp:Q8_0': 1}

The "model" handed to this runtime is the path of a ``.gguf`` file, never a torch module: the
matmuls run in llama.cpp's kernels on the file's own block types (llama-cpp-python, the
``[llamacpp]`` extra), and the result's ``linear_paths`` counts the file's 2-D weight tensors
per type as ``llamacpp:<TYPE>``. The prompt ids come from the same WikiText-2 test slices as the
torch runtimes (the caller's tokenizer is the file's own). Prefill is one ``llama_decode`` of
the prompt (batches of up to 512), decode one ``llama_decode`` per token; the next token is the
argmax of the last position's logits read straight from the context.

Speed of light (:func:`gguf_cost`): bytes per decode step = every tensor's bytes as stored in
the file (the input embedding left out when an ``output`` tensor exists: only one row of it is
read) + the KV cache, which llama.cpp keeps in F16 by default.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from joules.bench.roofline import ModelCost
from joules.bench.runtimes import Runtime, register_runtime
from joules.deploy.llamacpp import gguf_tensor_table, last_token_argmax, load_llama
from joules.errors import ConfigError
from joules.models.loading import load_gguf_meta, resolve

KV_ELEMENT_BYTES = 2  # llama.cpp's default cache types are F16 (type_k = type_v = f16)
_EXPORT_HINT = "export it first: joules export DIR --to gguf -o model.gguf"


def gguf_path(model: Any) -> Path:
    """``model`` as the path of a .gguf file, or a one-line ConfigError naming the fix."""
    if isinstance(model, str | os.PathLike) and Path(model).suffix.lower() == ".gguf":
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"no GGUF file at {path}: {_EXPORT_HINT}")
        return path
    what = model if isinstance(model, str | os.PathLike) else type(model).__name__
    raise ConfigError(f"--runtime llamacpp runs a .gguf file, got {what}: {_EXPORT_HINT}")


def gguf_tensors(path: str | os.PathLike[str]) -> list[tuple[str, str, int, int, int]]:
    """``(name, type, n_elements, n_bytes, n_dims)`` of every tensor stored in a GGUF file."""
    return gguf_tensor_table(path)


def gguf_linear_paths(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many 2-D weight tensors llama.cpp runs per block type: ``{"llamacpp:Q4_0": n}``."""
    counts: Counter[str] = Counter(
        f"llamacpp:{typ}" for _, typ, _, _, nd in gguf_tensors(path) if nd >= 2
    )
    return dict(counts)


def gguf_cost(path: str | os.PathLike[str], info: Any) -> ModelCost:
    """The bytes a decode step of this file must move (its tensors as stored) and its FLOPs."""
    tensors = gguf_tensors(path)
    names = {t[0] for t in tensors}
    total = sum(t[3] for t in tensors)
    embed = sum(t[3] for t in tensors if t[0] == "token_embd.weight")
    streamed = total - (embed if "output.weight" in names else 0)
    layer_params = sum(t[2] for t in tensors if t[0].startswith("blk.") and t[4] >= 2)
    return ModelCost(
        streamed_bytes=float(streamed),
        matmul_params=float(layer_params),
        head_params=float(info.vocab_size * info.hidden_size),
        layers=info.layers,
        heads=info.heads,
        kv_heads=info.kv_heads,
        head_dim=info.head_dim,
        kv_element_bytes=KV_ELEMENT_BYTES,
        model_bytes=float(total),
    )


@register_runtime("llamacpp")
class LlamaCppRuntime(Runtime):
    """llama.cpp (llama-cpp-python) decoding a GGUF file greedily, batch 1."""

    takes_torch_model = False  # it runs the .gguf file, not a torch module (no sweep bench)
    compute_dtype = "fp32"  # the prefill limit: ggml's quantized dots run in SIMD int8/fp32
    # llama.cpp's own default on a CPU (`-fa auto`); its F16 arithmetic may change a greedy
    # choice where two logits are near-equal (a random tiny model), never the speed it measures
    flash_attn: bool = True

    @classmethod
    def load(cls, spec: Any) -> tuple[Any, Any, Any]:
        """The GGUF path itself, with the tokenizer and ModelInfo of the file (read from its
        metadata: nothing is dequantized)."""
        kind, path = resolve(spec)
        if kind != "gguf":
            raise ConfigError(f"--runtime llamacpp runs a .gguf file, got {spec}: {_EXPORT_HINT}")
        gguf_tensors(path)  # a truncated or foreign file: one line, before transformers reads it
        lm = load_gguf_meta(path)
        return path, lm.tokenizer, lm.info

    @classmethod
    def model_facts(cls, model: Any, info: Any, dtype: str) -> tuple[ModelCost, str]:
        path = gguf_path(model)
        if dtype != "auto":
            raise ConfigError(
                f"--dtype {dtype}: llama.cpp runs the file's own tensor types, use --dtype auto"
            )
        return gguf_cost(path, info), cls.compute_dtype

    @classmethod
    def linear_paths(cls, model: Any) -> dict[str, int]:
        return gguf_linear_paths(gguf_path(model))

    def __init__(self, model: Any, *, batch: int, max_len: int) -> None:
        path = gguf_path(model)
        if batch != 1:
            raise ConfigError(f"the llamacpp runtime benches batch 1, got --batch {batch}")
        super().__init__(str(path), batch=batch, max_len=max_len)
        self.threads = torch.get_num_threads()
        self.llm = load_llama(
            path, n_ctx=max_len + 8, threads=self.threads, flash_attn=self.flash_attn
        )
        self.notes.append(
            f"llama.cpp ran {path.name} ({self.threads} threads, F16 KV cache, "
            f"flash attention {'on' if self.flash_attn else 'off'})"
        )

    def _next(self) -> torch.Tensor:
        return torch.tensor([last_token_argmax(self.llm)])

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if ids.shape[0] != 1 or ids.shape[1] >= self.max_len:
            raise ConfigError(f"llamacpp runtime built for 1 × <{self.max_len}, got {ids.shape}")
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return self._next(), None

    def decode_step(self, token: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        self.llm.eval([int(token[0])])
        return self._next(), state
