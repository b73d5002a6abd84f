"""llama.cpp through llama-cpp-python (optional extra ``[llamacpp]``): its own quantizer, and
perplexity and decode speed of a GGUF file on the same protocol as the torch path.

    >>> from joules.deploy.llamacpp import ggml_quantize, llamacpp_perplexity
    >>> blocks = ggml_quantize(weights_f32, "Q4_K")                 # doctest: +SKIP
    >>> llamacpp_perplexity("out.gguf", tokenizer, text, window=512)  # doctest: +SKIP

``ggml_quantize`` calls ``ggml_quantize_chunk`` of the ggml library that llama-cpp-python
ships (no importance matrix: llama.cpp's reference quantizers, what ``llama-quantize`` runs
without ``--imatrix``); ``quantize_file`` calls ``llama_model_quantize``. Perplexity feeds the
very windows :func:`joules.evaluate.perplexity.perplexity` plans (same tokens, BOS rule and
scored positions) and takes every logit of each window, so the two paths differ only in the
arithmetic of the runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from joules.data.tokens import tokenize_stream
from joules.deploy.gguf_export import check_gguf_file
from joules.errors import ConfigError
from joules.evaluate.perplexity import _decoded_bytes, _unscored, plan_windows
from joules.evaluate.results import PerplexityProtocol, PerplexityResult, weighted_mean_stderr
from joules.evaluate.scoring import bos_default
from joules.system import cpu_flags

INSTALL_HINT = "install the llamacpp extra: pip install 'joules[llamacpp]' (compiles ~10 min)"


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(f"the llama.cpp runtime needs llama-cpp-python: {INSTALL_HINT}") from exc
    return llama_cpp


_GGML: Any = None


def ggml_lib() -> Any:
    """The ggml base library shipped inside llama-cpp-python, with ggml_quantize_chunk typed."""
    global _GGML
    if _GGML is not None:
        return _GGML
    llama_cpp = _llama_cpp()
    libdir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
    for c in cands:
        try:
            lib = ctypes.CDLL(str(c))
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        _GGML = lib
        return lib
    raise ConfigError(f"no ggml library with ggml_quantize_chunk in {libdir}: {INSTALL_HINT}")


def ggml_quantize(x: np.ndarray, ggml_type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer: fp32 ``x`` [rows, k] -> GGUF block bytes [rows, row_bytes].

    ``imatrix`` (float32 [k]) is the importance of each column, as ``llama-quantize --imatrix``
    passes it (:meth:`joules.deploy.imatrix.Imatrix.values`); types that ignore it (Q8_0, the
    float types) give the same bytes either way."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[ggml_type.upper()]
    block, type_size = GGML_QUANT_SIZES[t]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.reshape(-1, x.shape[-1]).shape
    if k % block:
        raise ConfigError(f"{ggml_type}: rows of {k} are not a multiple of {block}")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.size != k:
            raise ConfigError(f"imatrix has {qw.size} values for rows of {k}: one per column")
    out = np.zeros((rows, k // block * type_size), dtype=np.uint8)
    n = ggml_lib().ggml_quantize_chunk(
        int(t), x.ctypes.data, out.ctypes.data, 0, rows, k, None if qw is None else qw.ctypes.data
    )
    if n != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
    return out


# llama_ftype values (llama.h) of the types the deploy benchmark compares
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q6_K": 18}


def quantize_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str, threads: int = 2
) -> None:
    """``llama-quantize src dst ftype`` through ``llama_model_quantize`` (no imatrix)."""
    llama_cpp = _llama_cpp()
    if ftype not in FTYPES:
        raise ConfigError(f"ftype {ftype!r}: use one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConfigError(f"llama_model_quantize({src} -> {ftype}) failed with code {rc}")


@functools.lru_cache(maxsize=32)
def _tensor_table(
    path: str, size: int, mtime_ns: int
) -> tuple[tuple[str, str, int, int, int], ...]:
    reader = check_gguf_file(path)
    return tuple(
        (
            t.name,
            t.tensor_type.name,
            int(t.n_elements),
            int(t.n_bytes),
            len([d for d in t.shape if int(d) > 1]),
        )
        for t in reader.tensors
    )


def gguf_tensor_table(path: str | os.PathLike[str]) -> list[tuple[str, str, int, int, int]]:
    """``(name, type, n_elements, n_bytes, n_dims > 1)`` of every tensor of a GGUF file, checked
    once per file version (gguf's reader parses the tokenizer arrays in Python: seconds)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        check_gguf_file(p)  # the one-line error for a missing file
        raise
    return list(_tensor_table(str(p.resolve()), st.st_size, st.st_mtime_ns))


def extra_buffers_safe() -> bool:
    """Whether llama.cpp may repack weights into its "extra" CPU buffer types on this machine.

    On CPUs with AMX (Sapphire Rapids and later) the vendored llama.cpp repacks Q4/Q8 weights
    into its AMX buffer, and ``llama_decode`` then segfaults (seen with llama-cpp-python 0.3.36
    on SmolLM2's shipped Q4_1 file and on tiny exports, at 1 and 2 threads): a crash, not a
    slower path. There the weights stay in plain CPU buffers (llama.cpp's ``--no-extra-bufts``),
    which is what :func:`llama_runtime_note` reports. Elsewhere the default (repacked) path runs.
    """
    return not any(f.startswith("amx") for f in cpu_flags())


def llama_runtime_note() -> str:
    """How llama.cpp holds the weights here, for protocols and bench notes."""
    if extra_buffers_safe():
        return "llama.cpp default buffers (repacked where llama.cpp repacks)"
    return "llama.cpp plain CPU buffers (extra/AMX buffers off: they crash llama_decode here)"


@contextlib.contextmanager
def llama_model_params(**fields: Any) -> Iterator[None]:
    """Inside, ``llama_cpp.Llama(...)`` loads with these ``llama_model_params`` fields set.

    llama-cpp-python's constructor exposes only some of llama.cpp's model parameters; it builds
    the rest from ``llama_model_default_params()``, which this wraps for the duration.
    """
    low = _llama_cpp().llama_cpp
    orig = low.llama_model_default_params

    def patched() -> Any:
        params = orig()
        for k, v in fields.items():
            setattr(params, k, v)
        return params

    low.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = orig


def load_llama(
    path: str | os.PathLike[str],
    n_ctx: int = 2048,
    threads: int | None = None,
    logits_all: bool = False,
    flash_attn: bool = True,
) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` (a truncated or foreign file is a one-line error).

    ``flash_attn`` on by default, as llama.cpp's own tools run a CPU (``-fa auto``), so the
    perplexity, KL divergence and decode speed joules reports are those of the runtime users
    run (llama-cpp-python's own default is off; the two differ by a few hundredths of a nat)."""
    gguf_tensor_table(path)  # a truncated or foreign file: one line, checked once per file
    llama_cpp = _llama_cpp()
    threads = threads or min(os.cpu_count() or 1, 8)
    try:
        with llama_model_params(use_extra_bufts=extra_buffers_safe()):
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=min(n_ctx, 512),
                logits_all=logits_all,
                flash_attn=flash_attn,
                verbose=False,
            )
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"llama.cpp cannot load {path}: {str(exc).splitlines()[0]}") from None


def decoded_logits(llm: Any, tokens: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Decode ``tokens`` from an empty context with every position's logits, batch by batch:
    ``(position of the batch's first token, float32 [n, V])``, the array a view of llama.cpp's
    output buffer, valid until the next decode.

    The batches, positions and logit flags are those of llama-cpp-python's ``Llama.eval`` with
    ``logits_all`` (so the logits are the same bits), but nothing is copied into ``llm.scores``:
    load the model without ``logits_all`` and that ``[n_ctx, V]`` float32 array (525 MB for a
    1,025-token context and a 128k vocabulary) is never touched."""
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    n_vocab = int(llm.n_vocab())
    for start in range(0, len(tokens), llm.n_batch):
        batch = list(tokens[start : start + llm.n_batch])
        llm._batch.set_batch(batch=batch, n_past=start, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[start : start + len(batch)] = batch
        llm.n_tokens = start + len(batch)
        yield start, np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), n_vocab))


# Positions whose float64 log-sum-exp is computed at once: 64 x 128k x 8 B = 66 MB a temporary.
_NLL_ROWS = 64


def _window_nll(llm: Any, tokens: list[int], score_from: int) -> tuple[float, int]:
    """Sum of NLLs (nats) of ``tokens[score_from:]`` given their prefixes, one llama.cpp decode.

    Each position's NLL is ``logsumexp - logit`` in float64, a few rows at a time as the
    batches' logits arrive (one row's arithmetic never depends on the others, so the sum is
    the one of the whole ``[T - 1, V]`` float64 matrix this used to build)."""
    tgt = np.asarray(tokens[1:])
    begin, end = score_from - 1, len(tokens) - 1  # positions whose next token is scored
    parts = []
    for first, logits in decoded_logits(llm, tokens):
        for r0 in range(max(begin, first), min(end, first + len(logits)), _NLL_ROWS):
            r1 = min(end, first + len(logits), r0 + _NLL_ROWS)
            x = np.asarray(logits[r0 - first : r1 - first], dtype=np.float64)  # [n, V]
            m = x.max(axis=1)
            lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
            parts.append(lse - x[np.arange(r1 - r0), tgt[r0:r1]])
    nll = np.concatenate(parts) if parts else np.zeros(0)
    return float(nll.sum()), len(tokens) - score_from


def llamacpp_perplexity(
    path: str | os.PathLike[str],
    tokenizer: Any,
    text: str | Sequence[int],
    *,
    window: int = 1024,
    stride: int | None = None,
    limit_tokens: int | None = None,
    add_bos: bool | None = None,
    dataset: str = "<text>",
    split: str | None = None,
    threads: int | None = None,
) -> Any:
    """Perplexity of a GGUF file under llama.cpp, on the windows the torch path uses."""
    stride = window if stride is None else stride
    if add_bos is None:
        add_bos = bos_default(tokenizer)
    ids = (
        tokenize_stream(tokenizer, text, limit_tokens)
        if isinstance(text, str)
        else list(text)[: limit_tokens or None]
    )
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    windows = plan_windows(len(ids), window, stride, add_bos)
    llm = load_llama(path, n_ctx=window + 1, threads=threads)  # logits: decoded_logits
    offset = 1 if add_bos else 0
    sums, counts = [], []
    t0 = time.perf_counter()
    for w in windows:
        toks = ([tokenizer.bos_token_id] if add_bos else []) + ids[w.begin : w.end]
        s, n = _window_nll(llm, toks, offset + w.score_from - w.begin)
        sums.append(s)
        counts.append(n)
    duration_s = time.perf_counter() - t0
    text_bytes = _decoded_bytes(tokenizer, ids)
    unscored = sum(_decoded_bytes(tokenizer, [ids[i]]) for i in _unscored(len(ids), windows))
    mean, stderr = weighted_mean_stderr(sums, counts)
    protocol = PerplexityProtocol(
        model=f"llamacpp:{Path(path).name}",
        dataset=dataset,
        split=split,
        tokenizer=type(tokenizer).__name__,
        window=window,
        stride=stride,
        add_bos=add_bos,
        limit_tokens=limit_tokens,
        stream_tokens=len(ids),
        text_bytes=text_bytes,
        dtype="gguf",
        batch_size=1,
        # llama.cpp's own CPU kernels for each tensor's GGUF type; not a speed probe's choice.
        compute_path="llamacpp:"
        + ("default-buffers" if extra_buffers_safe() else "cpu-buffers")
        + ", flash attention",
    )
    return PerplexityResult(
        protocol=protocol,
        nll_mean=mean,
        nll_stderr=stderr,
        tokens_scored=sum(counts),
        windows=len(windows),
        scored_bytes=max(0, text_bytes - unscored),
        duration_s=duration_s,
        window_nll_sums=sums,
        window_tokens=counts,
    )


def last_token_argmax(llm: Any) -> int:
    """Greedy next token from the last evaluated position's logits, read from the context
    (``llm.scores`` keeps no logits unless the model was loaded with ``logits_all``)."""
    ptr = llm._ctx.get_logits_ith(-1)
    return int(np.ctypeslib.as_array(ptr, shape=(int(llm.n_vocab()),)).argmax())


@dataclass
class DecodeSpeed:
    """Greedy decode of ``new_tokens`` after a ``prompt_tokens`` prompt under llama.cpp."""

    path: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prompt processing + first token
    tpot_s: float  # mean time per later token
    decode_tokens_per_s: float
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def llamacpp_decode_speed(
    path: str | os.PathLike[str],
    prompt: Sequence[int],
    new_tokens: int = 64,
    threads: int | None = None,
    repeats: int = 3,
) -> DecodeSpeed:
    """Median-of-``repeats`` TTFT and time per output token of greedy decoding (after a warm-up)."""
    threads = threads or min(os.cpu_count() or 1, 8)
    llm = load_llama(path, n_ctx=len(prompt) + new_tokens + 8, threads=threads)
    prompt = list(prompt)

    def once() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_token_argmax(llm)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = last_token_argmax(llm)
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1)

    once()  # warm-up: page in the weights, build the graph
    runs = sorted(once() for _ in range(repeats))
    ttft = sorted(r[0] for r in runs)[len(runs) // 2]
    tpot = sorted(r[1] for r in runs)[len(runs) // 2]
    return DecodeSpeed(
        str(path), len(prompt), new_tokens, ttft, tpot, 1 / tpot if tpot > 0 else math.inf, threads
    )
