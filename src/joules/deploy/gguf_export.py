"""Export a model (a joules-compressed directory, an HF directory or a GGUF) to a GGUF file.

    >>> from joules.deploy import export_gguf
    >>> res = export_gguf("out/", "model.gguf")                      # doctest: +SKIP
    >>> res.type_counts()                                            # doctest: +SKIP
    {'Q4_0': 210, 'F32': 62}

Tensors compressed in a GGUF-exact format (``gguf-*``, and OCP ``mxfp4``, which repacks into
GGUF MXFP4 losslessly) are written as computed -- their stored block bytes, never re-quantized.
Other compressed tensors are refused with the list of formats that map, unless
``dequantize="f16"|"bf16"|"f32"`` asks for them as floats (recorded as not exact). Float tensors
are written as ``float_type`` (F32 by default, so the file decodes to the very weights of the
source); norms are always F32, as llama.cpp expects.

Architectures (:data:`ARCHS`): llama and mistral (written as GGUF ``llama``), qwen2 (q/k/v
biases), qwen3 (per-head q/k norms) and gemma3 (``Gemma3ForCausalLM``: norms shifted by 1, four
per block, sliding-window layers and their own RoPE base from the config's ``layer_types``). llama-family GGUF stores the rows of ``attn_q`` and
``attn_k`` permuted for its RoPE layout (``convert_hf_to_gguf.py``'s ``permute``): the exporter
permutes whole rows of the quantized blocks (a row of a GGUF tensor is a run of whole blocks),
which is exact; qwen2/qwen3 use NEOX-style RoPE and keep the rows. Biases and norms are F32.
Metadata (``<arch>.*`` hyper-parameters) comes from the model config; the tokenizer is copied from the source GGUF when
the model came from one (the shipped SmolLM2), else built from a byte-level BPE
``tokenizer.json`` (``tokenizer.ggml.model = gpt2``). What was written, tensor by tensor, is in
the returned :class:`ExportResult` and in the file's ``joules.export`` metadata string.

A compressed directory is streamed: its skeleton says every tensor's GGUF type and size, so the
header is written first, then each tensor is read from the shards
(:class:`~joules.compress.api.CompressedWeights`), converted and written before the next is
read, float ones in row chunks of :data:`_CHUNK_ELEMS` elements (a conversion, and GGUF
quantization, never mixes rows). Peak memory is one tensor's working set (a 128k-vocabulary
embedding or head in 64 MB pieces), whatever the depth; the file is byte for byte the one the
whole loaded model writes. An HF directory or a GGUF file is loaded whole, as before.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from joules import formats
from joules.compress import read_manifest
from joules.compress.api import open_compressed
from joules.compress.modules.linear import CompressedLinear, module_class
from joules.compress.offload import release_freed_memory
from joules.errors import ConfigError, UnsupportedModelError
from joules.formats.gguf import PRESETS, get_gguf, mxfp4_to_gguf_blocks
from joules.models import load_model
from joules.models.loading import resolve
from joules.serialize import atomic_path

# Hugging Face names of llama-family modules -> GGUF names (llama.cpp's convention).
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GGUFArch:
    """How one Hugging Face ``model_type`` is written, as ``convert_hf_to_gguf.py`` writes it:
    the GGUF architecture (the metadata prefix llama.cpp dispatches on), whether attn_q /
    attn_k rows (and their biases) are permuted for llama.cpp's interleaved RoPE (llama family)
    or kept (NEOX-style RoPE: qwen2, qwen3, gemma3), block-module names of its own, and what is
    added to every norm weight (gemma's RMSNorm scales by ``1 + w``; llama.cpp's by ``w``)."""

    gguf: str
    permute_qk: bool
    names: dict[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0


ARCHS = {
    "llama": GGUFArch("llama", True),
    # MistralForCausalLM is converted as llama (convert_hf_to_gguf registers it with LlamaModel);
    # llama.cpp's llama graph has no sliding window, as for the converted Mistral files
    "mistral": GGUFArch("llama", True),
    "qwen2": GGUFArch("qwen2", False),  # q/k/v biases
    "qwen3": GGUFArch("qwen3", False),  # per-head q/k RMSNorm (attn_q_norm, attn_k_norm)
    # Gemma3ForCausalLM: four norms per block (post-attention and post-feed-forward ones too),
    # q/k norms, the embedding scaled by sqrt(hidden) inside llama.cpp's graph, sliding-window
    # layers as its config lists them
    "gemma3_text": GGUFArch(
        "gemma3",
        False,
        {
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        },
        norm_offset=1.0,
    ),
}
SUPPORTED_ARCHS = tuple(ARCHS)


def gguf_name(hf: str, arch: GGUFArch | None = None) -> str | None:
    """GGUF tensor name of a Hugging Face parameter name (None if it has none); ``arch``'s own
    block-module names first."""
    stem, _, kind = hf.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        block = {**_BLOCK, **(arch.names if arch else {})}
        if rest in block:
            return f"blk.{parts[2]}.{block[rest]}.{kind}"
    return None


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for rotary halves: rows [h, 2, d/2] -> [h, d/2, 2] per head.

    Works on any tensor whose leading dimension is the output rows (floats, or a GGUF block
    byte array [rows, row_bytes]); the inverse is transformers' ``reverse_permute_weights``."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rows`."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass
class ExportedTensor:
    """One tensor of the written file: where it came from and how it was stored."""

    name: str
    source: str
    ggml_type: str
    shape: list[int]
    nbytes: int
    exact: bool  # True: the stored values are the source's, bit for bit
    source_format: str | None = None  # the joules format of a compressed tensor
    permuted: bool = False


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote."""

    path: str
    source: str
    recipe: str | None
    tokenizer_from: str
    float_type: str
    tensors: list[ExportedTensor] = field(default_factory=list)
    file_nbytes: int = 0

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.ggml_type for t in self.tensors))

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["type_counts"] = self.type_counts()
        d["exact"] = self.exact
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ExportResult:
        d = {k: v for k, v in d.items() if k not in ("type_counts", "exact")}
        d["tensors"] = [ExportedTensor(**t) for t in d.get("tensors", [])]
        return ExportResult(**d)


def exact_gguf_specs() -> list[str]:
    """Formats whose tensors GGUF holds exactly."""
    return [*PRESETS, "mxfp4"]


def _exact_type(lin: Any) -> str | None:
    """The GGML type a CompressedLinear's stored blocks are written as, or None if GGUF cannot
    hold them exactly (read from its structure alone: no tensor is touched)."""
    if lin.sparse is not None or lin.act_quant is not None:
        return None
    if lin._buffers.get("mask_bits") is not None:  # a pruned layer's keep-mask
        return None
    if lin.spec.startswith("gguf-"):
        return get_gguf(lin.spec).ggml_type
    if lin.spec == "mxfp4" and lin.in_features % 32 == 0:
        return "MXFP4"
    return None


def gguf_exact(directory: str | os.PathLike[str]) -> bool:
    """Whether :func:`export_gguf` writes compressed ``directory`` without ``dequantize`` (every
    compressed layer in a format GGUF holds exactly), decided from its manifest alone."""
    with torch.device("meta"):
        for entry in read_manifest(directory).modules.values():
            mod = module_class(entry["type"]).from_config(entry["config"])
            if isinstance(mod, CompressedLinear) and _exact_type(mod) is None:
                return False
    return True


def _quantized_blocks(lin: Any) -> torch.Tensor:
    """The block bytes [rows, row_bytes] of a CompressedLinear whose :func:`_exact_type` is set."""
    qt = lin.qtensor()
    if qt.spec == "mxfp4":
        return mxfp4_to_gguf_blocks(qt)
    return qt.parts["blocks"].cpu().contiguous()


def _float_array(t: torch.Tensor, float_type: str) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType, quants

    a = t.detach().float().cpu().numpy()
    if float_type == "f32":
        return a, GGMLQuantizationType.F32
    if float_type == "f16":
        return a.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(a, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def _source_gguf(spec: str, path: Path, manifest: Any) -> Path | None:
    """The GGUF file the model came from, if any (the source model of a compressed dir)."""
    if path.suffix == ".gguf" and path.is_file():
        return path
    src = getattr(manifest, "source_model", "") if manifest is not None else ""
    if src:
        try:
            kind, p = resolve(src)
        except Exception:  # the source may have moved: fall back to the HF tokenizer
            return None
        if kind == "gguf":
            return Path(p)
    return None


def _copy_tokenizer_kv(writer: Any, src: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(name, f.contents(), vtype)


def _hf_tokenizer_kv(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE (gpt2-style) tokenizer.json -> tokenizer.ggml.* fields."""
    from gguf import GGUFValueType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            "GGUF export needs a fast tokenizer (tokenizer.json) or a GGUF source to copy "
            "the vocabulary from"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(
            f"GGUF export writes byte-level BPE tokenizers only, got {model.get('type')}: "
            "export a model that came from a GGUF file to copy its tokenizer"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED
    for tok, i in vocab.items():
        if i < vocab_size:
            tokens[i] = tok
            types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # llama.cpp requires merges for gpt2 tokenizers and gguf cannot write an empty array:
        # merge two special tokens (never merged: both tokenizers split specials out first)
        # into an unused slot
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        free = [i for i, t in enumerate(types) if t == 5]
        if not (bos and eos and free):
            raise ConfigError("GGUF export: a BPE tokenizer without merges and no free vocab slot")
        tokens[free[0]] = bos + eos
        merges = [f"{bos} {eos}"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # always written, even empty (a byte-level vocabulary without merges): llama.cpp requires
    # the key for gpt2 tokenizers, and transformers reads an empty list as "no merges"
    writer.add_key_value("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            add(int(v))
    writer.add_add_bos_token(False)


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters of one layer type (a gemma3 config keeps one dict per type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = isinstance(params.get(layer_type), dict)
    if nested:
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None) or {}
    if isinstance(scaling.get(layer_type), dict):
        scaling = scaling[layer_type]
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    theta = params.get("rope_theta") if nested else getattr(config, "rope_theta", None)
    theta = theta or params.get("rope_theta", 10000.0)
    return {"type": kind, "theta": float(theta)}


def _hparams(writer: Any, config: Any, arch: GGUFArch | None = None) -> int:
    """``<arch>.*`` metadata from an HF config; returns the head dimension."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = _rope(config)
    if rope["type"] not in ("default", None):
        raise ConfigError(
            f"GGUF export: rope scaling {rope['type']!r} is not written yet: export a model "
            "without rope_scaling"
        )
    theta = rope["theta"]
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    gemma3 = arch is not None and arch.gguf == "gemma3"
    if head_dim * n_head != config.hidden_size or gemma3:  # qwen3: head_dim is its own setting
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if gemma3:
        _gemma3_hparams(writer, config, head_dim)
    return head_dim


def _gemma3_hparams(writer: Any, config: Any, head_dim: int) -> None:
    """gemma3's own metadata (as convert_hf_to_gguf.py writes it), refusing in one line what
    llama.cpp's gemma3 graph would compute differently from transformers."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"GGUF export: gemma3 with activation {act!r}: llama.cpp runs tanh GELU")
    if getattr(config, "attn_logit_softcapping", None):
        raise ConfigError(
            "GGUF export: gemma3 with attention logit soft-capping: llama.cpp has none"
        )
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for 62 layers (27B)
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    want = hidden // heads if layers == 62 else head_dim
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and float(scalar) != float(want):
        raise ConfigError(
            f"GGUF export: gemma3 query_pre_attn_scalar {scalar}: llama.cpp's gemma3 graph scales "
            f"queries by 1/sqrt({want}) for this shape; export a model with query_pre_attn_scalar "
            f"= {want}"
        )
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    types = list(getattr(config, "layer_types", None) or [])
    if any(t == "sliding_attention" for t in types):
        local = _rope(config, "sliding_attention")
        if local["type"] not in ("default", None):
            raise ConfigError(f"GGUF export: rope scaling {local['type']!r} is not written yet")
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        writer.add_rope_freq_base_swa(local["theta"])


def _file_type(counts: Counter[str]) -> int:
    from gguf import LlamaFileType

    quant = [t for t, _ in counts.most_common() if t not in ("F32", "F16", "BF16")]
    name = f"MOSTLY_{quant[0]}" if quant else "ALL_F32"
    if name == "MOSTLY_Q4_K":
        name = "MOSTLY_Q4_K_M"
    if name == "MOSTLY_Q6_K":
        name = "MOSTLY_Q6_K"
    if name == "MOSTLY_MXFP4":
        name = "MOSTLY_MXFP4_MOE"
    return int(getattr(LlamaFileType, name, LlamaFileType.GUESSED))


def export_gguf(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    float_type: str = "f32",
    dequantize: str | None = None,
    embedding: str | None = None,
    output_head: str | None = None,
) -> ExportResult:
    """Write ``model`` (a compressed directory or any model spec) as a GGUF file at ``output``.

    ``embedding`` (a ``gguf-*`` spec) stores a float token embedding in that GGUF type (with
    llama.cpp's per-tensor fallback), quantized here by the same rounding as llama.cpp's own
    quantizer: what ``llama-quantize`` does to it (a tied SmolLM2 embedding becomes Q8_0), so
    a joules file and a llama.cpp file can share the embedding's type. Recorded as not exact.
    ``output_head`` does the same for an untied float output head (``llama-quantize``'s presets store
    it as Q6_K, Q8_0 for the Q8_0 preset or rows not divisible by 256)."""
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float type {float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
    if dequantize is not None and dequantize not in FLOAT_TYPES:
        raise ConfigError(f"--dequantize {dequantize!r}: use one of {', '.join(FLOAT_TYPES)}")
    out = Path(output)
    if out.suffix != ".gguf":
        raise ConfigError(f"output '{out}' must end in .gguf")
    kind, path = resolve(model)
    manifest = None
    if kind == "joules":
        manifest = read_manifest(path)
        # a directory compressed for a file size (gguf_mix, --target-size) names the types its
        # budget counted for the embedding and an untied head: they are the defaults here
        planned = manifest.gguf_export or {}
        embedding = embedding or planned.get("embedding")
        output_head = output_head or planned.get("output")
    source: Any
    if kind == "joules":  # streamed: tensor by tensor from the shards, nothing else resident
        source, tokenizer = open_compressed(path)
        if tokenizer.pad_token is None:  # as load_model sets it (the file records its id)
            tokenizer.pad_token = tokenizer.eos_token
    else:
        lm = load_model(model)
        source, tokenizer = _Loaded(lm.model), lm.tokenizer
    m = source.model
    config = m.config
    model_type = getattr(config, "model_type", "")
    if model_type not in ARCHS:
        raise ConfigError(
            f"GGUF export supports {', '.join(ARCHS)} models, got '{model_type}': export one of "
            "those, or convert this one with llama.cpp's convert_hf_to_gguf.py"
        )
    entries = _plan(source, ARCHS[model_type], float_type, dequantize, embedding, output_head)
    return _write(entries, source, tokenizer, model, path, manifest, float_type, out)


# Float rows converted (and quantized, for --embedding) at once: 64 MB of float32, so a 128k x
# 4096 embedding or head never has a whole-tensor float32 copy in memory.
_CHUNK_ELEMS = 1 << 24


@dataclass
class _Entry:
    """One tensor of the file: what the result records, its GGML type, and its bytes as a
    sequence of row chunks, made only when the tensor is written."""

    info: ExportedTensor
    raw: Any  # gguf.GGMLQuantizationType
    chunks: Callable[[], Iterator[np.ndarray]]


class _Loaded:
    """A model in memory, read through :class:`~joules.compress.api.CompressedWeights`'
    interface (an HF directory or a GGUF file: the whole model is loaded)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def resident(self, name: str) -> Iterator[nn.Module]:
        yield self.model.get_submodule(name)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.model.get_parameter(key).detach()[start:stop]


def _row_spans(shape: list[int]) -> list[tuple[int, int]]:
    """Row ranges of a tensor of ``shape`` of at most :data:`_CHUNK_ELEMS` elements each."""
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _nbytes(shape: list[int], raw: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[raw]
    return math.prod(shape) // block * type_size


_FLOAT_RAW = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_TORCH_FLOAT = {"f16": torch.float16, "bf16": torch.bfloat16}


def _plan(
    source: Any,
    arch: GGUFArch,
    float_type: str,
    dequantize: str | None,
    embedding: str | None,
    output_head: str | None,
) -> list[_Entry]:
    """Every tensor of the file, in the file's order, with how to make its bytes: decided from
    the model's structure alone (``source.model`` may be a meta-device skeleton)."""
    from gguf import GGMLQuantizationType

    m = source.model
    config = m.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries: list[_Entry] = []

    def add(name: str, hf: str, raw: str, shape: list[int], exact: bool, spec: str | None,
            permuted: bool, chunks: Callable[[], Iterator[np.ndarray]]) -> None:  # fmt: skip
        t = GGMLQuantizationType[raw]
        info = ExportedTensor(name, hf, raw, shape, _nbytes(shape, t), exact, spec, permuted)
        entries.append(_Entry(info, t, chunks))

    def floats(key: str, shape: list[int], ft: str, offset: float = 0.0) -> Any:
        def chunks() -> Iterator[np.ndarray]:
            for r0, r1 in _row_spans(shape):
                t = source.rows(key, r0, r1)
                yield _float_array(t.float() + offset if offset else t, ft)[0]

        return chunks

    def permuted_floats(mod_name: str, kind: str, heads: int, ft: str) -> Any:
        def chunks() -> Iterator[np.ndarray]:  # a head's rows are spread: the tensor at once
            with source.resident(mod_name) as mod:
                t = getattr(mod, kind).detach().float()
                yield _float_array(permute_rows(t, heads), ft)[0]

        return chunks

    def blocks(mod_name: str, heads: int, permute: bool) -> Any:
        def chunks() -> Iterator[np.ndarray]:
            with source.resident(mod_name) as lin:
                b = _quantized_blocks(lin)
                yield (permute_rows(b, heads) if permute else b).numpy()

        return chunks

    def dequantized(mod_name: str, heads: int, permute: bool, ft: str) -> Any:
        def chunks() -> Iterator[np.ndarray]:
            with source.resident(mod_name) as lin:
                w = lin.dequantize_weight().float()
                yield _float_array(permute_rows(w, heads) if permute else w, ft)[0]

        return chunks

    def quantized(name: str, hf: str, shape: list[int], spec: str) -> None:
        """A float embedding or head stored as GGUF type ``spec`` (llama.cpp's fallback for
        its rows), quantized here: recorded as not exact."""
        efmt = formats.get(spec).for_shape(tuple(shape))
        if efmt.family != "gguf":
            flag = "--embedding" if name == "token_embd.weight" else "--output-head"
            raise ConfigError(f"{flag} {spec!r}: use a gguf-* type, e.g. gguf-q8_0")

        def chunks() -> Iterator[np.ndarray]:
            for r0, r1 in _row_spans(shape):  # GGUF blocks never span rows: chunks are exact
                yield efmt.quantize(source.rows(hf, r0, r1).float()).parts["blocks"].numpy()

        add(name, hf, efmt.ggml_type, shape, False, efmt.spec, False, chunks)

    refused: dict[str, str] = {}
    handled: set[str] = set()
    for mod_name, mod in m.named_modules():
        if not isinstance(mod, CompressedLinear | nn.Linear):
            continue
        hf = f"{mod_name}.weight"
        name = gguf_name(hf, arch)
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for '{hf}' (llama layout expected)")
        if mod_name == "lm_head" and tied and not isinstance(mod, CompressedLinear):
            handled.add(hf)
            continue  # tied head: llama.cpp reads token_embd
        heads = n_head if name.endswith("attn_q.weight") else n_kv
        permute = arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight"))
        shape = [mod.out_features, mod.in_features]
        handled.add(hf)
        if (
            getattr(mod, "bias", None) is not None
        ):  # F32, in the rows' order (as convert_hf_to_gguf)
            bname = name.removesuffix(".weight") + ".bias"
            bias = (
                permuted_floats(mod_name, "bias", heads, "f32")
                if permute
                else floats(f"{mod_name}.bias", [shape[0]], "f32")
            )
            add(bname, f"{mod_name}.bias", "F32", [shape[0]], True, None, permute, bias)
        if isinstance(mod, CompressedLinear):
            gtype = _exact_type(mod)
            if gtype is not None:
                add(
                    name,
                    hf,
                    gtype,
                    shape,
                    True,
                    mod.spec,
                    permute,
                    blocks(mod_name, heads, permute),
                )
                continue
            if dequantize is None:
                refused[mod_name] = mod.spec
                continue
            chunks = dequantized(mod_name, heads, permute, dequantize)
            raw = _FLOAT_RAW[dequantize]
            add(name, hf, raw, shape, dequantize == "f32", mod.spec, permute, chunks)
            continue
        if name == "output.weight" and output_head is not None:  # an untied float head
            quantized(name, hf, shape, output_head)
            continue
        ok = float_type == "f32" or mod.weight.dtype == _TORCH_FLOAT.get(float_type)
        chunks = (
            permuted_floats(mod_name, "weight", heads, float_type)
            if permute
            else floats(hf, shape, float_type)
        )
        add(name, hf, _FLOAT_RAW[float_type], shape, bool(ok), None, permute, chunks)
    if refused:
        specs = sorted(set(refused.values()))
        raise ConfigError(
            f"{len(refused)} layers are in formats GGUF cannot hold exactly ({', '.join(specs)}; "
            f"e.g. {next(iter(refused))}): GGUF-exact formats are {', '.join(exact_gguf_specs())}; "
            "or pass --dequantize f16|bf16|f32 to write them as floats"
        )
    for hf, p in m.named_parameters():
        if hf in handled or (hf.endswith(".bias") and hf.rpartition(".")[0] + ".weight" in handled):
            continue  # a linear's bias went with its weight
        name = gguf_name(hf, arch)
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for parameter '{hf}'")
        shape = list(p.shape)
        is_norm = "norm" in name
        as_type = {"token_embd.weight": embedding, "output.weight": output_head}.get(name)
        if as_type is not None:
            quantized(name, hf, shape, as_type)
            continue
        ft = "f32" if is_norm or p.dim() == 1 else float_type
        offset = arch.norm_offset if is_norm else 0.0  # as convert_hf_to_gguf.py shifts them
        ok = ft == "f32" or p.dtype == _TORCH_FLOAT[ft]
        add(name, hf, _FLOAT_RAW[ft], shape, bool(ok), None, False, floats(hf, shape, ft, offset))
    return entries


def _write(
    entries: list[_Entry],
    source: Any,
    tokenizer: Any,
    model: str | os.PathLike[str],
    path: Path,
    manifest: Any,
    float_type: str,
    out: Path,
) -> ExportResult:
    """Write the header (every tensor's type and size is known from the plan), then each
    tensor's bytes as its chunks are made: one tensor's working set at a time."""
    from gguf import GGUFWriter

    config = source.model.config
    arch = ARCHS[config.model_type]
    src_gguf = _source_gguf(str(model), Path(path), manifest)
    # A kill mid-export leaves the previous file (or none), never a truncated GGUF.
    with atomic_path(out) as tmp:
        writer = GGUFWriter(str(tmp), arch.gguf)
        try:
            writer.add_name(getattr(config, "_name_or_path", "") or Path(str(model)).name)
            _hparams(writer, config, arch)
            writer.add_file_type(_file_type(Counter(e.raw.name for e in entries)))
            writer.add_quantization_version(2)
            if src_gguf is not None:
                _copy_tokenizer_kv(writer, src_gguf)
                tok_from = f"gguf:{src_gguf.name}"
            else:
                _hf_tokenizer_kv(writer, tokenizer, int(config.vocab_size))
                tok_from = "tokenizer.json"
            result = ExportResult(
                path=str(out),
                source=str(model),
                recipe=getattr(manifest, "recipe", None),
                tokenizer_from=tok_from,
                float_type=float_type,
                tensors=[e.info for e in entries],
            )
            for e in entries:
                # the shape the file records is the logical one (gguf turns a byte shape back)
                writer.add_tensor_info(
                    e.info.name, e.info.shape, np.dtype(np.float32), e.info.nbytes, raw_dtype=e.raw
                )
            summary = {
                "source": result.source,
                "recipe": result.recipe,
                "exact": result.exact,
                "types": result.type_counts(),
            }
            writer.add_string("joules.export", json.dumps(summary))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for e in entries:
                _write_tensor(writer, e)
        finally:
            writer.close()
    result.file_nbytes = out.stat().st_size
    return result


def _write_tensor(writer: Any, entry: _Entry) -> None:
    """gguf's ``GGUFWriter.write_tensor_data`` for a tensor that comes in row chunks: aligned
    to the file's alignment, padded after, its size checked against the header's."""
    from gguf.gguf_writer import WriterState

    fout = writer.fout[0]
    ti = writer.tensors[0].pop(entry.info.name)
    writer.write_padding(fout, fout.tell())
    n = 0
    for chunk in entry.chunks():
        chunk = np.ascontiguousarray(chunk)
        chunk.tofile(fout)
        n += chunk.nbytes
        del chunk
    if n != ti.nbytes:
        raise RuntimeError(
            f"GGUF export: {entry.info.name} made {n} bytes, its header says {ti.nbytes}"
        )
    writer.write_padding(fout, n)
    writer.state = WriterState.WEIGHTS
    # hand the freed working set back: without it the heap kept each block's converted tensors
    # as fragments (RSS grew 64 MB per block of 12.6M weights written as F32, none alive)
    release_freed_memory()


def check_gguf_file(path: str | os.PathLike[str]) -> Any:
    """Open a GGUF file with gguf's reader, turning a truncated or foreign file into one line."""
    from gguf import GGUFReader

    p = Path(path)
    try:
        reader = GGUFReader(str(p))
        for t in reader.tensors:  # touch every tensor's extent: a truncated file fails here
            if int(t.data_offset) + int(t.n_bytes) > p.stat().st_size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedModelError(f"{p} is not a readable GGUF file ({msg})") from None
    return reader
