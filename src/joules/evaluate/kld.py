"""KL divergence from a base model's stored log-probabilities, through any runtime (llama.cpp's way).

    >>> from joules.models import tiny_model
    >>> from joules.data import load_text
    >>> from joules.evaluate.kld import TokenProtocol, TorchLogits, kl_divergence, reference_logprobs
    >>> model, tok, _ = tiny_model()
    >>> protocol = TokenProtocol(window=64, scored="second-half", limit_tokens=256)
    >>> ref = reference_logprobs(TorchLogits(model), tok, load_text("wikitext2"), protocol)
    >>> r = kl_divergence(TorchLogits(model), ref)      # a model against itself
    >>> r.kl_mean, r.top1_agreement, r.tokens_scored
    (0.0, 1.0, 124)

A :class:`LogitSource` is anything that returns the log-softmax of a causal LM at each position
of a row of token ids: :class:`TorchLogits` wraps a torch model through the one
:class:`~joules.evaluate.scoring.Scorer`; ``joules.deploy.llamacpp_logits.LlamaCppLogits`` runs a
GGUF file in llama.cpp. Sources are looked up by runtime name (:func:`logit_source`): ``torch``
here, ``llamacpp`` registered by ``joules.deploy.llamacpp_logits`` (the deploy layer sits above
this one).

**The protocol** (:class:`TokenProtocol`) says which tokens are fed and scored:

* ``scored="all"``: non-overlapping windows of ``window`` tokens as ``perplexity.py`` plans them
  (BOS *prepended* to each window with ``add_bos``; without BOS the first token of each window
  is context only);
* ``scored="second-half"``: ``llama-perplexity``'s own protocol. The text is one stream (a
  leading BOS when ``add_bos``, as llama.cpp's ``common_tokenize(..., add_special=true)``),
  cut into ``len(stream) // window`` chunks (the incomplete tail dropped); with ``add_bos`` the
  chunk's first token is *replaced* by BOS; the logits of positions ``window // 2`` to
  ``window - 2`` score the tokens after them, ``window - 1 - window // 2`` per chunk (255 of
  512). ``limit_tokens = chunks * window`` is ``llama-perplexity --chunks``.

**The reference store** (:func:`reference_logprobs`) computes the base model's log-probs over
the scored tokens once per model + protocol and keeps them as ``llama-perplexity
--kl-divergence-base`` does: per token, the log-probs within 16 nats of the top one as uint16
steps of ``scale = (max - min) / 65535`` above ``min`` (``min = max(lowest, top - 16)``; entries
below it stored as 0, i.e. dropped), with the float32 ``scale`` and ``min``. Beside that, per
token, three exact figures llama.cpp does not keep: the reference's NLL of the actual next token
(float64), its top token (int32), and the storage correction ``c = Σ_v p̂_v (l̂_v - l_v)``
(float64, over the stored entries ``v`` with ``l̂_v > -16``, ``p̂ = exp(l̂)``). Size: ``2 V +
28`` bytes per scored token (98,332 B for SmolLM2's 49,152 tokens: 1.6 GB per 16,384 tokens,
half of float32; llama.cpp's own file is ``2 V + 8``). With a ``key`` it lives under
``cache_dir()/kld-base/`` as memory-mapped ``.npy`` files and a JSON sidecar, written as one
atomic directory; without, in memory.

**KL per token**, as llama.cpp computes it from the stored log-probs ``l̂`` and the model's
log-probs ``m``, less the stored correction:
``KL = Σ_{v: l̂_v > -16} p̂_v (l̂_v - m_v) - c = Σ_{v: l̂_v > -16} p̂_v (l_v - m_v)``. So a
model against itself gives 0 exactly, and the only approximation left is the weights:
``|KL - KL_exact| <= (exp(scale / 2) - 1) · Σ_v p_v |l_v - m_v| + Σ_{dropped v} p_v |l_v - m_v|``
(plus float32 rounding; llama.cpp's own figure also carries ``Σ p̂ (l̂ - l)``, up to
``scale / 2 = 1.2e-4`` nats per token). Not clamped at 0 (as llama.cpp). Exact: the top-token
agreement (argmax of the model's float32 log-probs against the reference's, first index on
ties) and both NLLs (the perplexity ratio); llama.cpp reads the reference's NLL and top token
back from the uint16 store.

**Statistics** (:func:`kl_divergence` returns a
:class:`~joules.evaluate.results.DeviationResult`): mean KL with a 95 % Student t interval
over windows (per-window sums; tokens of one window are correlated, so llama.cpp's per-token
``± stderr`` is narrower), median and p99 by linear interpolation as llama.cpp's
``percentile``, max, top-1 agreement ("Same top p"), and the perplexity ratio model / reference
with its paired 95 % interval (:func:`joules.evaluate.paired.paired_nll`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from joules.data.tokens import tokenize_stream
from joules.errors import ConfigError
from joules.evaluate.paired import paired_nll, t95
from joules.evaluate.perplexity import plan_windows
from joules.evaluate.results import DeviationProtocol, DeviationResult, weighted_mean_stderr
from joules.evaluate.scoring import Scorer, bos_default
from joules.models import load_model
from joules.paths import cache_dir
from joules.registry import Registry
from joules.serialize import atomic_directory, atomic_write_json

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)

SCORED = ("all", "second-half")
CLIP_NATS = 16.0  # llama.cpp keeps log-probs within 16 nats of the top one ...
DROP_BELOW = -16.0  # ... and sums KL terms only where the stored log-prob exceeds -16
LEVELS = 65535  # uint16 steps between min and max
_KL_ROWS = 128  # rows decoded at once: 128 x 49,152 float32 = 25 MB per temporary
STORE_FORMAT = "joules-kld-base/1"
STORE_NOTE = (
    "llama.cpp --kl-divergence-base: per token uint16 log-probs within 16 nats of the top one "
    "(scale, min float32), plus exact NLL (float64), top token (int32) and storage correction "
    "sum p^(l^ - l) (float64)"
)


# -- logit sources -----------------------------------------------------------------------------
@runtime_checkable
class LogitSource(Protocol):
    """Log-softmax of a causal LM at each position of a row of token ids."""

    name: str
    vocab_size: int

    def compute_path(self) -> str:
        """How the source's arithmetic ran (a result's protocol records it)."""
        ...

    def logprobs(self, row: list[int], *, first: int = 0) -> torch.Tensor:
        """Float32 log-softmax ``[len(row) - first, V]`` of the next-token distributions at
        positions ``first .. len(row) - 1`` of ``row`` (position ``t`` has seen ``row[:t+1]``).

        A source may also define ``logprob_chunks(row, *, first, stop)``: the rows of
        ``logprobs(row, first=first)[: stop - first]`` as a sequence of ``[n, V]`` chunks, so a
        whole row's ``[len(row), V]`` log-probs never exist at once (:func:`logprob_groups`)."""
        ...


class TorchLogits:
    """A torch causal LM as a :class:`LogitSource`, through :class:`Scorer` (fp32 log-softmax,
    the vocabulary projected only at the positions asked for)."""

    runtime = "torch"

    def __init__(self, model: Any, name: str | None = None) -> None:
        self.scorer = Scorer(model)
        cfg = getattr(model, "config", None)
        self.name = name or getattr(cfg, "_name_or_path", "") or "model"
        head = getattr(model, "get_output_embeddings", lambda: None)()
        self.vocab_size = int(
            head.weight.shape[0] if head is not None else getattr(cfg, "vocab_size", 0)
        )

    def compute_path(self) -> str:
        return self.scorer.compute_path()

    def activations(self) -> str:
        return self.scorer.activations()

    @torch.inference_mode()
    def logprobs(self, row: list[int], *, first: int = 0) -> torch.Tensor:
        chunks = list(self.logprob_chunks(row, first=first))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.vocab_size)

    @torch.inference_mode()
    def logprob_chunks(
        self, row: list[int], *, first: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """The scorer's chunks of positions ``first ..`` (cut at ``stop``): the same chunks,
        so the same bits, as :meth:`logprobs` makes."""
        x = torch.tensor([row], device=self.scorer.device)  # [1, T]
        hidden, _ = self.scorer.hidden(x, use_cache=False)
        left = (len(row) if stop is None else stop) - first
        for lp in self.scorer.logprob_chunks(hidden[0, first:]):
            if left <= 0:
                break
            yield lp[:left].cpu()
            left -= len(lp)


def logprob_groups(
    source: LogitSource, row: list[int], first: int, stop: int, rows: int = _KL_ROWS
) -> Iterator[torch.Tensor]:
    """Log-probs of positions ``first .. stop - 1`` of ``row`` in groups of exactly ``rows``
    positions (the last one: what is left), whatever chunks the source makes: a window's
    ``[n, V]`` log-probs are never whole in memory, and the groups are the ones
    :func:`stored_kl_terms` sums over, so its float64 sums are the same bits."""
    # a subclass that redefines logprobs alone (a test's sharpened source) is read through it:
    # the chunks it inherits would be its parent's log-probs
    owner = next((c for c in type(source).__mro__ if "logprobs" in c.__dict__), None)
    make = getattr(source, "logprob_chunks", None)
    if owner is not None and "logprob_chunks" not in owner.__dict__:
        make = None
    chunks = (
        make(row, first=first, stop=stop)
        if make is not None
        else iter([source.logprobs(row, first=first)[: stop - first]])
    )
    held: list[torch.Tensor] = []
    n = 0
    for c in chunks:
        held.append(c)
        n += len(c)
        while n >= rows:
            both = torch.cat(held) if len(held) > 1 else held[0]
            yield both[:rows]
            rest = both[rows:]
            held, n = ([rest] if len(rest) else []), len(rest)
    if n:
        yield torch.cat(held) if len(held) > 1 else held[0]


LogitFactory = Callable[..., LogitSource]  # (model or spec, *, n_ctx, threads) -> source
LOGIT_SOURCES: Registry[LogitFactory] = Registry(
    "logit runtime",
    hint="llamacpp: import joules.deploy.llamacpp_logits, which registers it",
)


@LOGIT_SOURCES.register("torch")
def _torch_source(model: Any, *, n_ctx: int = 0, threads: int | None = None) -> LogitSource:
    """A loaded torch model, or a spec loaded in float32."""
    del n_ctx, threads  # the torch scorer needs neither
    if isinstance(model, (str, Path)):
        return TorchLogits(load_model(str(model), dtype=torch.float32).model, name=str(model))
    return TorchLogits(model)


def logit_source(runtime: str, model: Any, *, n_ctx: int, threads: int | None = None) -> Any:
    """The :class:`LogitSource` of ``model`` (a loaded model or a spec/path) under ``runtime``."""
    return LOGIT_SOURCES.get(runtime)(model, n_ctx=n_ctx, threads=threads)


def runtime_names() -> list[str]:
    """The registered logit runtimes."""
    return LOGIT_SOURCES.names()


# -- which tokens are fed and scored -----------------------------------------------------------
@dataclass(frozen=True)
class TokenProtocol:
    """Which tokens a KL divergence feeds and scores (see the module docstring)."""

    window: int = 512
    scored: str = "all"  # "all" | "second-half"
    add_bos: bool | None = None  # None: the tokenizer's own choice (bos_default)
    limit_tokens: int | None = None
    dataset: str = "<text>"

    def __post_init__(self) -> None:
        if self.scored not in SCORED:
            raise ConfigError(f"scored must be one of {', '.join(SCORED)}, got {self.scored!r}")
        if self.window < (4 if self.scored == "second-half" else 2):
            raise ConfigError(f"window must be at least 4 tokens, got {self.window}")


@dataclass(frozen=True)
class Row:
    """One fed row: ``tokens`` (BOS included), of which ``tokens[score_from:]`` are scored."""

    tokens: list[int]
    score_from: int

    @property
    def scored(self) -> int:
        return len(self.tokens) - self.score_from


def plan_rows(
    ids: Sequence[int], window: int, scored: str, add_bos: bool, bos_id: int | None
) -> list[Row]:
    """The rows a protocol feeds for the stream ``ids`` (no BOS in ``ids``)."""
    if add_bos and bos_id is None:
        raise ConfigError("add_bos is set but the tokenizer has no BOS token: pass add_bos=False")
    ids = list(ids)
    if scored == "all":
        head = [bos_id] if add_bos else []
        return [
            Row(head + ids[w.begin : w.end], len(head) + w.score_from - w.begin)
            for w in plan_windows(len(ids), window, window, add_bos)
        ]
    if scored != "second-half":
        raise ConfigError(f"scored must be one of {', '.join(SCORED)}, got {scored!r}")
    stream = ([bos_id] if add_bos else []) + ids
    rows = []
    for c in range(len(stream) // window):
        chunk = stream[c * window : (c + 1) * window]
        if add_bos:
            chunk[0] = bos_id  # llama-perplexity replaces the chunk's first token
        rows.append(Row(chunk, window // 2 + 1))
    if not rows:
        raise ConfigError(
            f"the text has {len(stream)} token(s): the second-half protocol needs at least one "
            f"chunk of {window}"
        )
    return rows


def protocol_ids(
    tokenizer: Any, text: str | Sequence[int], protocol: TokenProtocol
) -> tuple[list[int], TokenProtocol, int | None]:
    """The token stream, the protocol with ``add_bos`` resolved, and the BOS id."""
    add_bos = bos_default(tokenizer) if protocol.add_bos is None else protocol.add_bos
    if isinstance(text, str):
        ids = tokenize_stream(tokenizer, text, protocol.limit_tokens)
    else:
        ids = list(text)[: protocol.limit_tokens]
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s): a KL divergence needs at least 2")
    return ids, replace(protocol, add_bos=add_bos), getattr(tokenizer, "bos_token_id", None)


# -- the compact store -------------------------------------------------------------------------
def quantize_logprobs(lp: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's ``log_softmax`` store of float32 log-probs ``[n, V]``: uint16 steps
    ``[n, V]``, ``scale`` and ``min`` float32 ``[n]`` (entries at or below ``min`` -> 0)."""
    lp = lp.float()
    top = lp.max(-1).values
    low = torch.maximum(lp.min(-1).values, top - CLIP_NATS)
    scale = (top - low) / LEVELS
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    steps = torch.round((lp - low[:, None]) * inv[:, None])  # round half to even, as nearest_int
    steps = torch.where(lp > low[:, None], steps, torch.zeros_like(steps)).clamp_(0, LEVELS)
    return steps.to(torch.int32).numpy().astype(np.uint16), scale.numpy(), low.numpy()


def decode_logprobs(q: np.ndarray, scale: np.ndarray, low: np.ndarray) -> torch.Tensor:
    """``scale * q + min`` in float32 ``[n, V]``, as llama.cpp reads its store back (the
    arrays may be read-only memory maps: they are copied, never written)."""
    qt = torch.from_numpy(np.array(q, dtype=np.float32))
    s = torch.from_numpy(np.array(scale, dtype=np.float32))
    m = torch.from_numpy(np.array(low, dtype=np.float32))
    return s[:, None] * qt + m[:, None]


def stored_kl_terms(
    q: np.ndarray, scale: np.ndarray, low: np.ndarray, lp: torch.Tensor
) -> torch.Tensor:
    """``Σ_{v: l̂_v > -16} p̂_v (l̂_v - lp_v)`` per row (float64 ``[n]``), llama.cpp's sum,
    in chunks of rows (one fixed order: a model against itself repeats it bit for bit)."""
    out = []
    for s in range(0, q.shape[0], _KL_ROWS):
        dec = decode_logprobs(q[s : s + _KL_ROWS], scale[s : s + _KL_ROWS], low[s : s + _KL_ROWS])
        terms = torch.where(
            dec > DROP_BELOW, dec.exp() * (dec - lp[s : s + _KL_ROWS]), torch.zeros_like(dec)
        )
        out.append(terms.double().sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class ReferenceLogprobs:
    """A base model's log-probs over a protocol's scored tokens, kept as llama.cpp keeps them.

    Arrays (one row per scored token, rows in protocol order): ``steps`` uint16 ``[N, V]``,
    ``scale``/``low`` float32, ``nll`` float64 (exact), ``top1`` int32 (exact), ``correction``
    float64 (see the module docstring). ``tokens`` is the stream (int32, no BOS).
    """

    protocol: TokenProtocol  # add_bos resolved
    reference: str
    compute_path: str
    runtime: str
    vocab_size: int
    bos_id: int | None
    tokens: np.ndarray
    window_tokens: list[int]
    steps: np.ndarray
    scale: np.ndarray
    low: np.ndarray
    nll: np.ndarray
    top1: np.ndarray
    correction: np.ndarray
    key: str | None = None
    path: Path | None = None

    ARRAYS = ("tokens", "steps", "scale", "low", "nll", "top1", "correction")

    def rows(self) -> list[Row]:
        p = self.protocol
        return plan_rows(self.tokens.tolist(), p.window, p.scored, bool(p.add_bos), self.bos_id)

    @property
    def tokens_scored(self) -> int:
        return int(self.steps.shape[0])

    def step_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``steps`` (read from the store's file: see :func:`_read_rows`)."""
        return _read_rows(self.steps, start, stop)

    @property
    def size_bytes(self) -> int:
        """Bytes of the per-token arrays (what grows with the text)."""
        return sum(int(getattr(self, a).nbytes) for a in self.ARRAYS if a != "tokens")

    @property
    def bytes_per_token(self) -> float:
        return self.size_bytes / max(self.tokens_scored, 1)

    def sidecar(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "key": self.key,
            "protocol": asdict(self.protocol),
            "reference": self.reference,
            "compute_path": self.compute_path,
            "runtime": self.runtime,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "tokens": int(self.tokens.shape[0]),
            "tokens_sha256": _sha256_ids(self.tokens),
            "tokens_scored": self.tokens_scored,
            "window_tokens": list(self.window_tokens),
            "storage": STORE_NOTE,
            "bytes_per_token": self.bytes_per_token,
        }

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceLogprobs:
        """A stored reference, its arrays memory-mapped (read-only)."""
        d = Path(directory)
        meta = json.loads((d / "reference.json").read_text())
        if meta.get("format") != STORE_FORMAT:
            raise ConfigError(f"{d} is not a {STORE_FORMAT} store: delete it to recompute")
        arrays = {a: np.load(d / f"{a}.npy", mmap_mode="r") for a in cls.ARRAYS}
        return cls(
            protocol=TokenProtocol(**meta["protocol"]),
            reference=meta["reference"],
            compute_path=meta["compute_path"],
            runtime=meta["runtime"],
            vocab_size=meta["vocab_size"],
            bos_id=meta["bos_id"],
            window_tokens=list(meta["window_tokens"]),
            key=meta["key"],
            path=d,
            **arrays,
        )


def _read_rows(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``a``; of a memory-mapped ``.npy`` file, read from the file: a
    memory map read through keeps every page it touched in this process's RSS, which for the
    uint16 store is 2 V bytes per token (1 GB for 4,096 tokens of a 128k vocabulary)."""
    if not isinstance(a, np.memmap) or a.filename is None:
        return np.asarray(a[start:stop])
    row = math.prod(a.shape[1:])
    count = (stop - start) * row
    out = np.fromfile(
        a.filename, dtype=a.dtype, count=count, offset=a.offset + start * row * a.itemsize
    )
    return out.reshape(stop - start, *a.shape[1:])


def _write_rows(a: np.ndarray, start: int, rows: np.ndarray) -> None:
    """``a[start : start + len(rows)] = rows``; into a memory-mapped ``.npy`` file, written to the
    file (dirty pages of a shared map count in RSS until written back: see :func:`_read_rows`)."""
    if not isinstance(a, np.memmap) or a.filename is None:
        a[start : start + len(rows)] = rows
        return
    data = np.ascontiguousarray(rows, dtype=a.dtype)
    with open(a.filename, "r+b") as f:
        f.seek(a.offset + start * math.prod(a.shape[1:]) * a.itemsize)
        f.write(data.tobytes())


def _sha256_ids(ids: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()


def store_dir(
    key: str, protocol: TokenProtocol, ids: Sequence[int], reference: str, runtime: str
) -> Path:
    """Where the reference for ``key`` on these tokens lives: ``cache_dir()/kld-base/<name>``,
    the name readable from ``key`` and made unique by a hash of everything that decides it."""
    ident = json.dumps(
        [key, asdict(protocol), _sha256_ids(ids), reference, runtime, STORE_FORMAT],
        sort_keys=True,
    )
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:80] or "reference"
    return cache_dir() / "kld-base" / f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _runtime_of(source: Any) -> str:
    return str(getattr(source, "runtime", "torch"))


def reference_logprobs(
    source: LogitSource,
    tokenizer: Any,
    text: str | Sequence[int],
    protocol: TokenProtocol,
    *,
    key: str | None = None,
    progress: Progress | None = None,
) -> ReferenceLogprobs:
    """The base model's stored log-probs over ``protocol``'s scored tokens of ``text``.

    With ``key`` (the caller's identity of the model, e.g. its spec, content hash and runtime)
    the store is kept under :func:`store_dir` and read back (memory-mapped) on the next call
    with the same key, protocol and tokens; without, it is built in memory.
    """
    ids, protocol, bos_id = protocol_ids(tokenizer, text, protocol)
    rows = plan_rows(ids, protocol.window, protocol.scored, bool(protocol.add_bos), bos_id)
    runtime = _runtime_of(source)
    directory = store_dir(key, protocol, ids, source.name, runtime) if key else None
    if directory is not None and (directory / "reference.json").is_file():
        return ReferenceLogprobs.load(directory)
    n = sum(r.scored for r in rows)
    v = int(source.vocab_size)
    if directory is None:
        arrays = _arrays(None, n, v)
        return _fill(source, rows, ids, arrays, protocol, runtime, bos_id, key, progress)
    with atomic_directory(directory) as staging:  # a kill leaves no half-written store
        arrays = _arrays(staging, n, v)
        ref = _fill(source, rows, ids, arrays, protocol, runtime, bos_id, key, progress)
        for a in arrays.values():
            a.flush()  # type: ignore[attr-defined]  (memory maps)
        np.save(staging / "tokens.npy", ref.tokens)
        atomic_write_json(staging / "reference.json", ref.sidecar())
        del arrays, ref
    return ReferenceLogprobs.load(directory)


def _arrays(staging: Path | None, n: int, v: int) -> dict[str, np.ndarray]:
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "steps": ((n, v), np.uint16),
        "scale": ((n,), np.float32),
        "low": ((n,), np.float32),
        "nll": ((n,), np.float64),
        "top1": ((n,), np.int32),
        "correction": ((n,), np.float64),
    }
    if staging is None:
        return {a: np.empty(s, t) for a, (s, t) in shapes.items()}
    return {
        a: np.lib.format.open_memmap(staging / f"{a}.npy", mode="w+", dtype=t, shape=s)
        for a, (s, t) in shapes.items()
    }


def _fill(
    source: LogitSource,
    rows: list[Row],
    ids: list[int],
    arrays: dict[str, np.ndarray],
    protocol: TokenProtocol,
    runtime: str,
    bos_id: int | None,
    key: str | None,
    progress: Progress | None,
) -> ReferenceLogprobs:
    total = sum(r.scored for r in rows)
    pos = 0
    for row in rows:
        first, stop = row.score_from - 1, len(row.tokens) - 1  # the positions that score a token
        at = row.score_from  # the token the group's first position scores
        for lp in logprob_groups(source, row.tokens, first, stop):  # [n <= _KL_ROWS, V]
            _check_vocab(lp, source.vocab_size, source.name)
            q, scale, low = quantize_logprobs(lp)
            tgt = torch.tensor(row.tokens[at : at + len(lp)])
            at += len(lp)
            sl = slice(pos, pos + len(lp))
            _write_rows(arrays["steps"], pos, q)
            arrays["scale"][sl] = scale
            arrays["low"][sl] = low
            arrays["nll"][sl] = (-lp.gather(1, tgt[:, None])[:, 0].double()).numpy()
            arrays["top1"][sl] = lp.argmax(-1).numpy()
            # Σ p̂ (l̂ - l): what llama.cpp's sum adds to the KL through the storage alone
            arrays["correction"][sl] = stored_kl_terms(q, scale, low, lp).numpy()
            pos += len(lp)
        if progress:
            progress(pos, total)
    return ReferenceLogprobs(
        protocol=protocol,
        reference=source.name,
        compute_path=source.compute_path(),
        runtime=runtime,
        vocab_size=int(source.vocab_size),
        bos_id=bos_id,
        tokens=np.asarray(ids, dtype=np.int32),
        window_tokens=[r.scored for r in rows],
        key=key,
        **arrays,
    )


def _check_vocab(lp: torch.Tensor, vocab_size: int, name: str) -> None:
    if lp.shape[-1] != vocab_size:
        raise ConfigError(
            f"{name} returned {lp.shape[-1]} log-probs per position but has a vocabulary of "
            f"{vocab_size}: its logits and vocabulary disagree"
        )


# -- the statistics ----------------------------------------------------------------------------
def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's ``percentile``: linear interpolation at ``fraction * (n - 1)``."""
    return float(np.quantile(values, fraction)) if values.size else math.nan


@dataclass(frozen=True)
class KLSummary:
    """The figures of a :class:`DeviationResult` that come from per-token values."""

    kl_mean: float
    kl_stderr: float
    kl_lo: float
    kl_hi: float
    kl_median: float
    kl_p99: float
    kl_max: float
    ppl_ratio_lo: float
    ppl_ratio_hi: float

    @classmethod
    def of(
        cls,
        kl: np.ndarray,
        window_kl: list[float],
        window_tokens: list[int],
        window_nll: list[float],
        window_nll_ref: list[float],
    ) -> KLSummary:
        mean, stderr = weighted_mean_stderr(window_kl, window_tokens)
        half = t95(len(window_tokens) - 1) * stderr
        ratio = paired_nll(window_nll, window_tokens, window_nll_ref, window_tokens)
        lo, hi = ratio.ppl_ratio_ci95
        return cls(
            kl_mean=mean,
            kl_stderr=stderr,
            kl_lo=mean - half,
            kl_hi=mean + half,
            kl_median=float(np.median(kl)) if kl.size else math.nan,
            kl_p99=percentile(kl, 0.99),
            kl_max=float(kl.max()) if kl.size else math.nan,
            ppl_ratio_lo=lo,
            ppl_ratio_hi=hi,
        )

    def fields(self) -> dict[str, float]:
        return asdict(self)


def kl_divergence(
    source: LogitSource,
    reference: ReferenceLogprobs,
    progress: Progress | None = None,
    *,
    model_name: str | None = None,
    reference_name: str | None = None,
) -> DeviationResult:
    """KL(reference ‖ model) and llama.cpp's companion figures of ``source`` against the stored
    ``reference``, on the reference's own rows (see the module docstring)."""
    if int(source.vocab_size) != reference.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({source.vocab_size}) differs from the reference's "
            f"({reference.vocab_size}): compare models of one tokenizer"
        )
    rows = reference.rows()
    if [r.scored for r in rows] != list(reference.window_tokens):
        raise ConfigError("the stored reference does not match its own protocol: recompute it")
    total = reference.tokens_scored
    kls: list[np.ndarray] = []
    w_kl: list[float] = []
    w_nll: list[float] = []
    w_ref: list[float] = []
    agree = 0
    pos = 0
    t0 = time.perf_counter()
    for row in rows:
        first, stop = row.score_from - 1, len(row.tokens) - 1  # the positions that score a token
        at = row.score_from
        row_kl: list[np.ndarray] = []
        row_nll: list[torch.Tensor] = []
        for lp in logprob_groups(source, row.tokens, first, stop):  # [n <= _KL_ROWS, V]
            _check_vocab(lp, reference.vocab_size, source.name)
            n = lp.shape[0]
            sl = slice(pos, pos + n)
            steps = reference.step_rows(pos, pos + n)
            raw = stored_kl_terms(steps, reference.scale[sl], reference.low[sl], lp)
            row_kl.append(raw.numpy() - np.asarray(reference.correction[sl]))
            tgt = torch.tensor(row.tokens[at : at + n])
            row_nll.append(-lp.gather(1, tgt[:, None])[:, 0].double())
            agree += int((lp.argmax(-1).numpy() == np.asarray(reference.top1[sl])).sum())
            at += n
            pos += n
        # the window's sums over its whole per-token vectors, as they were summed before
        kl = np.concatenate(row_kl) if row_kl else np.zeros(0)
        nll = torch.cat(row_nll) if row_nll else torch.zeros(0, dtype=torch.float64)
        sl = slice(pos - len(kl), pos)
        kls.append(kl)
        w_kl.append(float(kl.sum()))
        w_nll.append(float(nll.sum()))
        w_ref.append(float(np.asarray(reference.nll[sl]).sum()))
        if progress:
            progress(pos, total)
    all_kl = np.concatenate(kls) if kls else np.zeros(0)
    counts = list(reference.window_tokens)
    summary = KLSummary.of(all_kl, w_kl, counts, w_nll, w_ref)
    p = reference.protocol
    protocol = DeviationProtocol(
        model=model_name or source.name,
        reference=reference_name or reference.reference,
        transform=None,
        dataset=p.dataset,
        window=p.window,
        limit_tokens=p.limit_tokens,
        add_bos=bool(p.add_bos),
        sqnr_modules="none",
        activation_dtype=getattr(source, "activations", lambda: "")(),
        compute_path=source.compute_path(),
        reference_compute_path=reference.compute_path,
        scored=p.scored,
        runtime=_runtime_of(source),
        reference_runtime=reference.runtime,
        reference_store=(
            f"{STORE_NOTE}; {reference.bytes_per_token:,.0f} bytes per token"
            + (f"; key {reference.key}" if reference.key else "")
        ),
        stream_tokens=int(reference.tokens.shape[0]),
    )
    return DeviationResult(
        protocol=protocol,
        tokens_scored=total,
        top1_agreement=agree / total if total else math.nan,
        nll_model=sum(w_nll) / total if total else math.nan,
        nll_reference=sum(w_ref) / total if total else math.nan,
        layers=[],
        duration_s=time.perf_counter() - t0,
        window_tokens=counts,
        window_kl_sums=w_kl,
        window_nll_sums=w_nll,
        window_nll_reference_sums=w_ref,
        **summary.fields(),
    )


__all__ = [
    "LOGIT_SOURCES",
    "KLSummary",
    "LogitSource",
    "ReferenceLogprobs",
    "Row",
    "TokenProtocol",
    "TorchLogits",
    "kl_divergence",
    "logit_source",
    "plan_rows",
    "quantize_logprobs",
    "reference_logprobs",
    "runtime_names",
    "store_dir",
]
