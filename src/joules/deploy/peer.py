"""The llama.cpp peer file of a preset, with or without an importance matrix, no source build.

    >>> from joules.deploy.peer import base_f32_gguf, llamacpp_peer
    >>> f32 = base_f32_gguf("smollm2-135m")                               # doctest: +SKIP
    >>> llamacpp_peer(f32, "Q4_K_M", "q4_k_m.gguf", imatrix=im).types     # doctest: +SKIP
    {'token_embd.weight': 'Q8_0', 'blk.0.attn_q.weight': 'Q4_K', ...}

``llamacpp_peer`` is ``llama-quantize [--imatrix FILE] F32.gguf OUT PRESET``: the same library
call (``llama_model_quantize`` of the llama.cpp that llama-cpp-python ships) with the same
parameters, the importance matrix handed over as llama-quantize hands it (``sums / count`` per
column, :meth:`joules.deploy.imatrix.Imatrix.values`) and the same ``quantize.imatrix.*``
metadata (file name as given, first dataset, number of entries, number of chunks). So the file
is byte for byte the one the source-built tool writes from the same imatrix file
(``benchmarks/peers/llamacpp/check.py``), and each quantized tensor is
``ggml_quantize_chunk(type, F32 rows, imatrix)`` of its F32 data (tests/deploy/test_peer.py).

llama.cpp's choice of types depends on whether an imatrix is given, so the types are read from
the written file, never assumed from the no-imatrix file: with one, Q4_0 and Q5_0 store the
``ffn_down`` of the first ``n_layer/8`` layers as Q4_1/Q5_1, and IQ4_NL/IQ4_XS keep those
IQ4 instead of Q5_K. Rows not divisible by a type's block fall back (``tensor_type_fallback``).
IQ4_NL and IQ4_XS run without an imatrix in llama.cpp (refused only for types that require one:
IQ1/IQ2/IQ3_XXS, and Q2_K_S's Q2_K tensors), so only IQ3_XXS among the presets here is refused.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from joules.deploy.gguf_export import export_gguf
from joules.deploy.imatrix import Imatrix
from joules.deploy.llamacpp import _llama_cpp, gguf_tensor_table
from joules.errors import ConfigError
from joules.fingerprint import cache_key, file_sha256
from joules.models.loading import model_identity
from joules.paths import cache_dir
from joules.serialize import atomic_path

# llama_ftype of each preset (vendored include/llama.h)
PRESETS: dict[str, int] = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_0": 8,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_0": 2,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "Q3_K_M": 12,
    "Q2_K": 10,
    "IQ3_XXS": 23,
}
# presets whose tensors llama.cpp refuses to quantize without an imatrix (tensor_requires_imatrix)
NEEDS_IMATRIX = frozenset({"IQ3_XXS"})

# what llama-quantize records when given --imatrix (tools/quantize/quantize.cpp)
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class PeerFile:
    """A llama.cpp-quantized GGUF file and what llama.cpp chose for each tensor."""

    path: str
    size_bytes: int
    sha256: str
    ftype: str
    imatrix: bool
    types: dict[str, str] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PeerFile:
        return PeerFile(**d)


def base_f32_gguf(model: str | os.PathLike[str]) -> Path:
    """The F32 GGUF export of ``model`` (any model spec), the input of every peer file; cached
    under ``cache_dir()/peers`` by model content, joules code and library versions."""
    ident = model_identity(model)
    key = cache_key([ident["sha256"], "f32"])
    stem = Path(str(model)).name.removesuffix(".gguf") or "model"
    out = cache_dir() / "peers" / f"{stem}-f32-{key}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(model, out, float_type="f32")
    return out


def _kv_override(llama_cpp: Any, key: str, value: str | int) -> Any:
    o = llama_cpp.llama_model_kv_override()
    o.key = key.encode()
    if isinstance(value, str):
        o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        o.value.val_str = value.encode()[:127]  # strncpy(val_str, ..., 127)
    else:
        o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        o.value.val_i64 = int(value)
    return o


def llamacpp_peer(
    f32_gguf: str | os.PathLike[str],
    ftype: str,
    out: str | os.PathLike[str],
    *,
    imatrix: Imatrix | None = None,
    imatrix_file: str | None = None,
    threads: int = 2,
) -> PeerFile:
    """``llama-quantize [--imatrix FILE] f32_gguf out ftype``, through llama-cpp-python.

    ``imatrix_file`` is what ``quantize.imatrix.file`` records (llama-quantize writes the path it
    was given): by default ``imatrix.source`` (the path :func:`load_imatrix` read), else
    ``"joules"``. Written atomically."""
    key = ftype.upper()
    if key not in PRESETS:
        raise ConfigError(f"llama.cpp preset {ftype!r}: use one of {', '.join(PRESETS)}")
    if imatrix is None and key in NEEDS_IMATRIX:
        raise ConfigError(
            f"llama.cpp refuses {key} without an importance matrix: pass imatrix= "
            "(compute_imatrix or load_imatrix)"
        )
    src = Path(f32_gguf)
    gguf_tensor_table(src)  # a missing or foreign input: one line
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[key]
    params.nthread = threads
    keep: list[Any] = []  # the ctypes buffers must outlive the call
    if imatrix is not None:
        names = imatrix.names()
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, name in enumerate(names):
            vals = np.ascontiguousarray(imatrix.values(name), dtype=np.float32)
            if not np.isfinite(vals).all():
                raise ConfigError(f"the importance matrix of {name} has non-finite values")
            keep += [vals, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = vals.size
        entries[len(names)].name = None  # terminator
        params.imatrix = entries
        kv: list[tuple[str, str | int]] = [
            (KV_IMATRIX_FILE, imatrix_file or imatrix.source or "joules")
        ]
        if imatrix.datasets:
            kv.append((KV_IMATRIX_DATASET, imatrix.datasets[0]))
        kv.append((KV_IMATRIX_N_ENTRIES, len(names)))
        if imatrix.chunk_count > 0:
            kv.append((KV_IMATRIX_N_CHUNKS, imatrix.chunk_count))
        overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (k, v) in enumerate(kv):
            overrides[i] = _kv_override(llama_cpp, k, v)
        overrides[len(kv)].key = b""  # terminator
        params.kv_overrides = overrides
        keep += [entries, overrides]
    dst = Path(out)
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise ConfigError(f"llama_model_quantize({src.name} -> {key}) failed with code {rc}")
    size, digest = file_sha256(dst)
    return PeerFile(
        path=str(dst),
        size_bytes=size,
        sha256=digest,
        ftype=key,
        imatrix=imatrix is not None,
        types={t[0]: t[1] for t in gguf_tensor_table(dst)},
    )
