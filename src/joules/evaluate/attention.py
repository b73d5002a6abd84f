"""Attention stability: how far attention implementations deviate from fp64 at low precision.

    >>> from joules.evaluate.attention import attention_deviation
    >>> r = attention_deviation(seq_lens=[128], dtypes=["bf16"], block_sizes=[64], heads=2)
    >>> {"standard", "flash-style", "sdpa-math"} <= {row.impl for row in r.rows}
    True

After Golden et al. 2024, "Is Flash Attention Stable?": the same causal attention
``softmax(Q Kᵀ / √d + mask) V`` computed by

* ``standard``: the textbook form, every op in the input dtype (scores, softmax output and
  ``P V`` are rounded to it, as eager PyTorch does);
* ``sdpa-<backend>``: ``torch.nn.functional.scaled_dot_product_attention`` forced onto each
  backend that runs on this device (on CPU: ``math`` and ``flash``);
* ``flash-style``: a blockwise online-softmax written here in torch, organised as
  FlashAttention-2: query blocks × key blocks of ``block_size``, running max / sum / output
  accumulator kept in fp32, ``P`` rounded to the input dtype before ``P V``;
* ``flash-style-lowacc``: the same with the running sum and output accumulator rounded to the
  input dtype after every key block (state kept in bf16/fp16, as a cheaper kernel might);

each at fp32, bf16 and fp16 (fp64 as a self-check), and in any format of the formats module
emulated with its ``fake_quant`` (``formats=``; rounding where the dtype would round), against standard attention in fp64 on the
*same rounded inputs*, so only the computation's rounding is measured. Inputs: Q, K, V ~ N(0, 1)
from a fixed seed, batch 1, ``heads`` × ``head_dim`` 64. Reported per (impl, dtype, seq_len,
block): max and mean absolute deviation of the output, and at bf16 the ratio flash-style /
standard (the paper finds flash about an order of magnitude more deviation in bf16).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from joules import dtypes
from joules.errors import ConfigError
from joules.evaluate.deviation import format_transform

DTYPES = dtypes.SHORT
DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCK_SIZES = (64, 128)


def parse_dtype(name: str) -> torch.dtype:
    """A floating-point dtype by short (``bf16``), torch (``bfloat16``) or alias (``half``) name."""
    return dtypes.float_dtype(name)


_dtype_name = dtypes.short_name


def _causal_mask(s_q: int, s_k: int, q_offset: int, k_offset: int, device) -> torch.Tensor:
    """True where query i may attend to key j (j <= i), for a block at the given offsets."""
    qi = torch.arange(q_offset, q_offset + s_q, device=device)[:, None]
    kj = torch.arange(k_offset, k_offset + s_k, device=device)[None, :]
    return kj <= qi  # [s_q, s_k]


Round = Callable[[torch.Tensor], torch.Tensor]  # emulates a format: values onto its grid


def standard_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rnd: Round | None = None
) -> torch.Tensor:
    """Causal attention with every op in the inputs' dtype. q, k, v: [B, H, S, D] -> [B, H, S, D].

    ``rnd`` (an emulated format on fp32 values) rounds the scores, the probabilities and the
    output, the three points where a dtype rounds them.
    """
    rnd = rnd or (lambda t: t)
    s = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    mask = _causal_mask(s, s, 0, 0, q.device)
    # One head at a time: the [S, S] scores of all heads at 4,096 tokens in fp64 would be 1 GB.
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = rnd((q[b, h] @ k[b, h].transpose(-1, -2)) * scale)  # [S, S] in q.dtype
            scores = scores.masked_fill(~mask, float("-inf"))
            out[b, h] = rnd(rnd(torch.softmax(scores, dim=-1)) @ v[b, h])
    return out


def flash_style_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    low_precision_accumulators: bool = False,
    rnd: Round | None = None,
) -> torch.Tensor:
    """Blockwise online-softmax causal attention (FlashAttention-2's organisation, in torch).

    q, k, v: [B, H, S, D] in a dtype; scores, running max m, running sum l and the output
    accumulator are fp32 (fp64 for fp64 inputs); each block's probabilities P are rounded to the
    input dtype before ``P V``, as the kernel feeds them to the tensor cores. With
    ``low_precision_accumulators`` the running sum and output accumulator are rounded to the
    input dtype after every key block (a kernel that keeps its state in bf16/fp16). ``rnd``
    replaces "round to the input dtype" by an emulated format (P, the state and the output).
    """
    dtype = q.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bsz, heads, s, d = q.shape
    scale = 1.0 / math.sqrt(d)
    nb = -(-s // block_size)  # number of blocks; the last one is zero-padded
    pad = nb * block_size - s

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, H, nb, bs, D]
        t = F.pad(t.to(acc_dtype), (0, 0, 0, pad))
        return t.view(bsz, heads, nb, block_size, d)

    # Padded keys sit after every real query, so the causal mask already hides them.
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    # The running state lives on the input's device (on a GPU, a CPU state would not even run).
    m = torch.full((bsz, heads, nb, block_size, 1), float("-inf"), dtype=acc_dtype, device=q.device)
    l = torch.zeros((bsz, heads, nb, block_size, 1), dtype=acc_dtype, device=q.device)  # noqa: E741
    acc = torch.zeros((bsz, heads, nb, block_size, d), dtype=acc_dtype, device=q.device)
    diag = _causal_mask(block_size, block_size, 0, 0, q.device)  # [bs, bs]
    # Key block j updates every query block i >= j at once: per query block the updates run
    # in the same order (j = 0, 1, ... i) as the kernel's inner loop, vectorised over i.
    for j in range(nb):
        sc = (qb[:, :, j:] @ kb[:, :, j : j + 1].transpose(-1, -2)) * scale  # [B, H, nb-j, bs, bs]
        sc[:, :, 0] = sc[:, :, 0].masked_fill(~diag, -math.inf)  # block i == j: causal mask
        m_old = m[:, :, j:]
        m_new = torch.maximum(m_old, sc.amax(-1, keepdim=True))
        p = torch.exp(sc - m_new)
        alpha = torch.exp(m_old - m_new)  # rescales what was accumulated under the old max
        l_new = l[:, :, j:] * alpha + p.sum(-1, keepdim=True)
        p_low = rnd(p) if rnd else p.to(dtype).to(acc_dtype)
        acc_new = acc[:, :, j:] * alpha + p_low @ vb[:, :, j : j + 1]
        if low_precision_accumulators:
            if rnd:
                l_new, acc_new = rnd(l_new), rnd(acc_new)
            else:
                l_new, acc_new = l_new.to(dtype).to(acc_dtype), acc_new.to(dtype).to(acc_dtype)
        m[:, :, j:], l[:, :, j:], acc[:, :, j:] = m_new, l_new, acc_new
    out = (acc / l).view(bsz, heads, nb * block_size, d)[:, :, :s]
    return rnd(out.contiguous()).to(dtype) if rnd else out.to(dtype)


def format_round(spec: str) -> Round:
    """The formats module's emulated ``fake_quant`` for ``spec``, on tensors of any rank.

    Group-wise formats group along the last dimension (the head dimension for Q, K, V and the
    key dimension for scores and probabilities).
    """
    fq = format_transform(spec)

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return fq(t.reshape(-1, t.shape[-1]).float()).reshape(t.shape).to(t.dtype)

    return rnd


def sdpa_backends() -> dict[str, Any]:
    """The SDPA backends torch has, by short name (which ones run is checked per dtype)."""
    from torch.nn.attention import SDPBackend

    names = {
        "math": "MATH",
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
    }
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def sdpa_attention(backend: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


@dataclass(frozen=True)
class AttentionDeviationRow:
    """Deviation of one implementation at one dtype / length / block size from fp64."""

    impl: str
    dtype: str
    seq_len: int
    block_size: int | None
    max_abs_dev: float
    mean_abs_dev: float
    duration_s: float


@dataclass(frozen=True)
class AttentionProtocol:
    heads: int
    head_dim: int
    batch: int
    seed: int
    causal: bool
    inputs: str
    reference: str
    device: str
    unavailable: list[str] = field(default_factory=list)  # impl/dtype pairs that did not run


@dataclass(frozen=True)
class AttentionDeviationResult:
    protocol: AttentionProtocol
    rows: list[AttentionDeviationRow]

    def ratios(
        self, dtype: str = "bf16", block_size: int | None = None, impl: str = "flash-style"
    ) -> list[dict[str, Any]]:
        """Per sequence length: ``impl`` / standard deviation at ``dtype`` (max and mean)."""
        out = []
        for s in sorted({r.seq_len for r in self.rows}):
            std = [
                r for r in self.rows if r.impl == "standard" and r.dtype == dtype and r.seq_len == s
            ]
            fl = [
                r
                for r in self.rows
                if r.impl == impl
                and r.dtype == dtype
                and r.seq_len == s
                and (block_size is None or r.block_size == block_size)
            ]
            if not std or not fl:
                continue
            f = min(fl, key=lambda r: r.block_size or 0) if block_size is None else fl[0]
            out.append(
                {
                    "seq_len": s,
                    "block_size": f.block_size,
                    "max_ratio": f.max_abs_dev / std[0].max_abs_dev
                    if std[0].max_abs_dev
                    else math.inf,
                    "mean_ratio": f.mean_abs_dev / std[0].mean_abs_dev
                    if std[0].mean_abs_dev
                    else math.inf,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": asdict(self.protocol),
            "rows": [asdict(r) for r in self.rows],
            "ratios_bf16": self.ratios("bf16"),
            "ratios_bf16_lowacc": self.ratios("bf16", impl="flash-style-lowacc"),
        }


def attention_deviation(
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16"),
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    *,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    impls: Sequence[str] | None = None,
    formats: dict[str, Round] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AttentionDeviationResult:
    """Run the attention-stability grid (see the module docstring) and return every row.

    ``formats`` maps a name to an emulated format (e.g. :func:`format_round` of ``mxfp8``):
    inputs are put on its grid, and standard and flash-style attention round at the points
    where a dtype would (SDPA cannot be emulated and is skipped for them).
    """
    if not seq_lens or min(seq_lens) < 1:
        raise ConfigError(f"seq_lens must be positive lengths, got {list(seq_lens)}")
    if not block_sizes or min(block_sizes) < 1:
        raise ConfigError(f"block sizes must be positive, got {list(block_sizes)}")
    tdtypes = [parse_dtype(d) for d in dtypes]
    backends = sdpa_backends()
    wanted = set(impls) if impls else None
    known = {"standard", "flash-style", "flash-style-lowacc", *(f"sdpa-{b}" for b in backends)}
    if wanted and not wanted <= known:
        raise ConfigError(
            f"unknown attention impl(s) {sorted(wanted - known)}: choose from {sorted(known)}"
        )

    def use(name: str) -> bool:
        return wanted is None or name in wanted

    rows: list[AttentionDeviationRow] = []
    unavailable: list[str] = []
    formats = dict(formats or {})
    precisions: list[tuple[str, torch.dtype, Round | None]] = [
        (_dtype_name(dt), dt, None) for dt in tdtypes
    ] + [(f"{name} (emulated)", torch.float32, fn) for name, fn in formats.items()]
    steps = len(seq_lens) * len(precisions)
    done = 0
    gen = torch.Generator().manual_seed(seed)
    for s in seq_lens:
        base = [
            torch.randn(1, heads, s, head_dim, generator=gen, dtype=torch.float64) for _ in "qkv"
        ]
        for pname, dt, rnd in precisions:
            q, k, v = (rnd(t.float()) if rnd else t.to(dt) for t in base)
            ref = standard_attention(*(t.to(torch.float64) for t in (q, k, v)))
            runs: list[tuple[str, int | None, Callable[[], torch.Tensor]]] = []
            if use("standard"):
                runs.append(
                    ("standard", None, lambda q=q, k=k, v=v, r=rnd: standard_attention(q, k, v, r))
                )
            for bname, backend in backends.items():
                if use(f"sdpa-{bname}") and rnd is None:
                    fn = sdpa_attention(backend)
                    runs.append((f"sdpa-{bname}", None, lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)))
            for name, low in (("flash-style", False), ("flash-style-lowacc", True)):
                if not use(name) or (low and rnd is not None):
                    continue
                for bs in block_sizes:
                    runs.append(
                        (
                            name,
                            bs,
                            lambda bs=bs, low=low, q=q, k=k, v=v, r=rnd: flash_style_attention(
                                q, k, v, bs, low, r
                            ),
                        )
                    )
            for name, bs, fn in runs:
                t0 = time.perf_counter()
                try:
                    out = fn()
                except RuntimeError:
                    # e.g. a CUDA-only SDPA backend on CPU, or a dtype a backend lacks
                    tag = f"{name}@{pname}"
                    if tag not in unavailable:
                        unavailable.append(tag)
                    continue
                dur = time.perf_counter() - t0
                dev = (out.to(torch.float64) - ref).abs()
                rows.append(
                    AttentionDeviationRow(
                        name, pname, s, bs, float(dev.max()), float(dev.mean()), dur
                    )
                )
            done += 1
            if progress:
                progress(done, steps)
    protocol = AttentionProtocol(
        heads=heads,
        head_dim=head_dim,
        batch=1,
        seed=seed,
        causal=True,
        inputs="Q, K, V ~ N(0, 1) in fp64, rounded to the dtype; reference sees the rounded values",
        reference="standard attention in fp64",
        device="cpu",
        unavailable=unavailable,
    )
    return AttentionDeviationResult(protocol, rows)
