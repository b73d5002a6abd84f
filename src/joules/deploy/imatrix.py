"""Importance matrices as llama.cpp's ``llama-imatrix`` computes and stores them.

    >>> from joules.deploy.imatrix import compute_imatrix, load_imatrix, save_imatrix
    >>> im = compute_imatrix(model, tokens)  # tokens: LongTensor [chunks, len]  # doctest: +SKIP
    >>> save_imatrix("imatrix.gguf", im)  # llama-quantize --imatrix reads it    # doctest: +SKIP
    >>> load_imatrix("imatrix.gguf").values("blk.0.attn_q.weight")               # doctest: +SKIP

What the vendored ``tools/imatrix/imatrix.cpp`` (llama-cpp-python 0.3.36) does, and this mirrors:

* It hooks every ``MUL_MAT`` whose weight is named ``blk.*`` (``output.weight`` only with
  ``--process-output``; a tied head multiplies by ``token_embd.weight`` and is never collected)
  and adds, per input column, the squares of the activations entering it (fp32), and the number
  of tokens. q, k and v read the same input but are separate matmuls: each has its own entry
  (equal values). Keys are the GGUF tensor names (:func:`joules.deploy.gguf_export.gguf_name`).
* A matmul over fewer than 16 tokens is skipped. The tokens of one matmul are llama.cpp's
  micro-batch, not a chunk: with the defaults (``-b 2048 -ub 512``, one KV stream per
  sequence) ``2048 // chunk_len`` chunks run together and are split into micro-batches of
  ``512 // n_seq`` tokens of each sequence; :func:`counted_tokens` reproduces which tokens
  that drops (none for 512-token chunks).
* Chunks are ``chunk_len`` consecutive tokens of the tokenized text; where the vocabulary adds
  BOS (``tokenizer.ggml.add_bos_token``), the first token of each chunk is *replaced* by BOS,
  not prepended (SmolLM2's vocabulary adds none). ``compute_imatrix`` runs the tokens it is
  given: the caller builds the chunks.
* Saved as GGUF (the default since 2025): per entry ``<name>.in_sum2`` (the raw sums, F32
  ``[n_in, n_mat]``) and ``<name>.counts`` (tokens, F32 ``[1, n_mat]``), names sorted, with
  ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and
  ``imatrix.chunk_size``. The legacy ``.dat`` (sums already divided by the count and multiplied
  by the number of chunks) is read, not written.
* ``llama-quantize`` hands the quantizer ``sums / count`` per column (fp32 division; 1 where the
  count is 0; for a legacy file ``value / ncall``): :meth:`Imatrix.values`.

joules sums in float64 and rounds once; llama.cpp adds token by token in fp32, and its forward
pass (F16 KV cache, its own kernels) differs in the last bits: compare with a tolerance.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from joules.compress.modules.linear import CompressedLinear
from joules.deploy.gguf_export import gguf_name
from joules.errors import ConfigError, UnsupportedModelError
from joules.serialize import atomic_write_bytes

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)

# llama-imatrix's defaults: -b (logical batch), -ub (micro-batch), the smallest matmul it keeps
N_BATCH = 2048
N_UBATCH = 512
MIN_TOKENS = 16


@dataclass
class Imatrix:
    """Per GGUF tensor name: the sums of squared inputs per column and the token counts.

    ``sums[name]`` is float32 ``[n_mat * n_in]`` (``n_mat`` is 1 for a dense weight),
    ``counts[name]`` int64 ``[n_mat]``; for a ``legacy`` file they are what the ``.dat`` holds
    (mean × chunks, and the chunks). ``source`` is the file it was read from, as given (what
    ``llama-quantize`` records in ``quantize.imatrix.file``)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    source: str = ""

    def names(self) -> list[str]:
        return sorted(self.sums)

    def values(self, name: str) -> np.ndarray:
        """What ``llama-quantize`` passes to ``ggml_quantize_chunk`` for ``name`` (float32)."""
        if name not in self.sums:
            raise ConfigError(f"the importance matrix has no entry {name!r}")
        sums = np.asarray(self.sums[name], dtype=np.float32)
        counts = np.asarray(self.counts[name], dtype=np.int64)
        if self.legacy:
            ncall = int(counts[0]) if counts.size else 0
            return sums / np.float32(ncall) if ncall > 0 else sums.copy()
        per = sums.reshape(counts.size, -1)
        out = np.ones_like(per)
        for j, c in enumerate(counts):
            if c > 0:
                out[j] = per[j] / np.float32(c)
        return out.reshape(-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: np.asarray(v, np.float32).tolist() for k, v in self.sums.items()},
            "counts": {k: np.asarray(v, np.int64).tolist() for k, v in self.counts.items()},
            "datasets": list(self.datasets),
            "chunk_count": self.chunk_count,
            "chunk_size": self.chunk_size,
            "legacy": self.legacy,
            "source": self.source,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Imatrix:
        return Imatrix(
            sums={k: np.asarray(v, np.float32) for k, v in d["sums"].items()},
            counts={k: np.asarray(v, np.int64) for k, v in d["counts"].items()},
            datasets=list(d.get("datasets", [])),
            chunk_count=int(d.get("chunk_count", 0)),
            chunk_size=int(d.get("chunk_size", 0)),
            legacy=bool(d.get("legacy", False)),
            source=str(d.get("source", "")),
        )


# ----------------------------------------------------------------------------------------------
# computing
# ----------------------------------------------------------------------------------------------


def counted_tokens(n_chunks: int, chunk_len: int) -> np.ndarray:
    """Which tokens of ``[n_chunks, chunk_len]`` reach llama-imatrix's sums (bool mask).

    llama-imatrix decodes ``n_seq = max(1, 2048 // chunk_len)`` chunks per batch (each its own
    sequence and KV stream; a chunk longer than 2048 in batches of 2048), and llama.cpp splits a
    batch into micro-batches of ``512 // n_seq`` tokens of every sequence (``split_equal``); a
    micro-batch of fewer than 16 tokens is not collected."""
    mask = np.ones((n_chunks, chunk_len), dtype=bool)
    n_seq = max(1, N_BATCH // chunk_len)
    n_batch = min(N_BATCH, n_seq * chunk_len)
    for first in range(0, n_chunks, n_seq):
        g = min(n_seq, n_chunks - first)
        per_seq = max(1, N_UBATCH // g)
        step = n_batch if g == 1 else chunk_len
        for b0 in range(0, chunk_len, step):
            b = min(step, chunk_len - b0)
            for u0 in range(0, b, per_seq):
                u = min(per_seq, b - u0)
                if g * u < MIN_TOKENS:
                    mask[first : first + g, b0 + u0 : b0 + u0 + u] = False
    return mask


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:
        raise UnsupportedModelError(
            f"compute_imatrix needs a causal LM with a decoder (get_decoder()), got "
            f"{type(model).__name__}"
        )
    return dec


@torch.no_grad()
def compute_imatrix(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    progress: ProgressFn | None = None,
    process_output: bool = False,
    dataset: str = "joules-calibration",
    batch_chunks: int = 4,
) -> Imatrix:
    """The importance matrix of ``model`` (fp32 forward) over ``tokens`` [n_chunks, chunk_len],
    as llama-imatrix computes it over the same chunks (see the module docstring).

    ``process_output`` adds ``output.weight`` (an untied head only: a tied head is
    ``token_embd.weight`` in llama.cpp, which it never collects). ``dataset`` is what the file's
    ``imatrix.datasets`` records."""
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ConfigError(
            f"compute_imatrix takes tokens [n_chunks, chunk_len], got shape {tuple(tokens.shape)}"
        )
    n_chunks, chunk_len = (int(s) for s in tokens.shape)
    mask = torch.from_numpy(counted_tokens(n_chunks, chunk_len))
    if not mask.any():
        raise ConfigError(
            f"{n_chunks} chunk(s) of {chunk_len} tokens: llama-imatrix collects no matmul under "
            f"{MIN_TOKENS} tokens, so nothing would be counted: pass more or longer chunks"
        )
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    targets: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear | CompressedLinear):
            continue
        g = gguf_name(f"{name}.weight")
        if g is None:
            continue
        if g.startswith("blk.") or (process_output and g == "output.weight" and not tied):
            targets[g] = mod
    if not targets:
        raise UnsupportedModelError(
            f"compute_imatrix found no decoder linears with GGUF names in {type(model).__name__}"
            " (llama layout expected)"
        )
    sums = {g: torch.zeros(m.in_features, dtype=torch.float64) for g, m in targets.items()}
    counted = 0
    cur_mask: list[torch.Tensor] = []

    def hook_for(g: str) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])[cur_mask[0].reshape(-1)]
            sums[g] += (x * x).sum(0)

        return hook

    decoder = _decoder(model)
    head = targets.get("output.weight")
    hooks = [m.register_forward_pre_hook(hook_for(g)) for g, m in targets.items() if m is not head]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n_chunks, batch_chunks):
            ids = tokens[i : i + batch_chunks].to(torch.long)
            cur_mask[:] = [mask[i : i + batch_chunks]]
            out = decoder(input_ids=ids, use_cache=False)
            if head is not None:
                hook_for("output.weight")(head, (out.last_hidden_state,))
            counted += int(cur_mask[0].sum())
            if progress is not None:
                progress("imatrix", min(i + batch_chunks, n_chunks), n_chunks)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return Imatrix(
        sums={g: s.to(torch.float32).numpy() for g, s in sorted(sums.items())},
        counts={g: np.array([counted], dtype=np.int64) for g in sorted(sums)},
        datasets=[dataset],
        chunk_count=counted // chunk_len,
        chunk_size=chunk_len,
    )


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSION = 3
_ALIGN = 32
_T_UINT32, _T_STRING, _T_ARRAY = 4, 8, 9
_GGML_F32 = 0


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def imatrix_gguf_bytes(im: Imatrix) -> bytes:
    """The GGUF bytes llama-imatrix's ``save_imatrix`` writes for ``im`` (ggml's own writer:
    no ``general.architecture``, alignment 32, tensors ``<name>.in_sum2``/``.counts`` by name)."""
    if im.legacy:
        raise ConfigError(
            "a legacy (.dat) importance matrix is saved as GGUF only after "
            "conversion: build an Imatrix of raw sums and counts"
        )
    datasets = list(im.datasets) or ["joules-calibration"]
    kv = [
        _gguf_str("general.type") + struct.pack("<I", _T_STRING) + _gguf_str("imatrix"),
        _gguf_str("imatrix.datasets")
        + struct.pack("<IIQ", _T_ARRAY, _T_STRING, len(datasets))
        + b"".join(_gguf_str(d) for d in datasets),
        _gguf_str("imatrix.chunk_count") + struct.pack("<II", _T_UINT32, im.chunk_count),
        _gguf_str("imatrix.chunk_size") + struct.pack("<II", _T_UINT32, im.chunk_size),
    ]
    tensors: list[tuple[str, list[int], bytes]] = []
    for name in im.names():
        sums = np.asarray(im.sums[name], dtype=np.float32).reshape(-1)
        counts = np.asarray(im.counts[name])
        nmat = counts.size
        if sums.size == 0 or nmat == 0:
            continue
        tensors.append((f"{name}.in_sum2", [sums.size // nmat, nmat], sums.tobytes()))
        tensors.append((f"{name}.counts", [1, nmat], counts.astype(np.float32).tobytes()))
    head = [_GGUF_MAGIC, struct.pack("<IQQ", _GGUF_VERSION, len(tensors), len(kv)), *kv]
    offset = 0
    for name, ne, data in tensors:
        dims = ne[: max(1, max((i + 1 for i, n in enumerate(ne) if n > 1), default=1))]
        head.append(_gguf_str(name) + struct.pack("<I", len(dims)))
        head.append(struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<iQ", _GGML_F32, offset))
        offset += -(-len(data) // _ALIGN) * _ALIGN
    out = bytearray(b"".join(head))
    out += b"\0" * (-len(out) % _ALIGN)
    for _, _, data in tensors:
        out += data + b"\0" * (-len(data) % _ALIGN)
    return bytes(out)


def save_imatrix(path: str | os.PathLike[str], imatrix: Imatrix) -> Path:
    """Write ``imatrix`` in llama-imatrix's GGUF format (what ``llama-quantize --imatrix``
    reads), atomically."""
    return atomic_write_bytes(path, imatrix_gguf_bytes(imatrix))


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix written by llama-imatrix (GGUF, or the legacy ``.dat``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no importance matrix at {p}: run llama-imatrix or save_imatrix first")
    data = p.read_bytes()
    im = _load_gguf(data, p) if data[:4] == _GGUF_MAGIC else _load_legacy(data, p)
    im.source = str(path)
    return im


def _load_gguf(data: bytes, p: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(p))
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{p} is not a readable imatrix GGUF ({msg})") from None
    fields = reader.fields
    missing = [
        k
        for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        if k not in fields
    ]
    if missing:
        # llama-quantize refuses it the same way ("missing imatrix metadata")
        raise ConfigError(f"{p}: missing imatrix metadata ({', '.join(missing)})")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        arr = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = arr.copy()
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.rint(arr).astype(np.int64)
    if sums.keys() != counts.keys():
        odd = sorted(set(sums) ^ set(counts))
        raise ConfigError(f"{p}: mismatched sums and counts for {odd[0]}")
    if not sums:
        raise ConfigError(f"{p}: no importance matrix entries")
    return Imatrix(
        sums=dict(sorted(sums.items())),
        counts=dict(sorted(counts.items())),
        datasets=[str(x) for x in fields["imatrix.datasets"].contents()],
        chunk_count=int(fields["imatrix.chunk_count"].contents()),
        chunk_size=int(fields["imatrix.chunk_size"].contents()),
    )


def _load_legacy(data: bytes, p: Path) -> Imatrix:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{p} is neither an imatrix GGUF nor a legacy .dat ({why})")

    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise bad("truncated")
        vals = struct.unpack_from(fmt, data, pos)
        pos += n
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise bad("no entries")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln < 0 or pos + ln > len(data):
            raise bad("bad name")
        name = data[pos : pos + ln].decode(errors="replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1:
            raise bad(f"no values for {name}")
        sums[name] = np.frombuffer(data, np.float32, nval, pos).copy()
        pos += 4 * nval
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if ln > 0 and pos + ln <= len(data):
                datasets.append(data[pos : pos + ln].decode(errors="replace"))
    return Imatrix(
        sums=dict(sorted(sums.items())),
        counts=dict(sorted(counts.items())),
        datasets=datasets,
        chunk_count=int(chunk_count),
        chunk_size=0,
        legacy=True,
    )
