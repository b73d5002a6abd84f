"""GGUF block types, bit for bit: the formats llama.cpp's kernels run, in the formats registry.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("gguf-q4_0")
    >>> fmt.bits_per_element((4096, 4096))               # 18-byte blocks of 32: 4 + 16/32
    4.5
    >>> x = torch.randn(8, 64)
    >>> q = fmt.quantize(x)
    >>> q.parts["blocks"].shape                          # the GGUF tensor data, row by row
    torch.Size([8, 36])
    >>> torch.equal(fmt.dequantize(q), fmt.fake_quant(x))
    True

Formats (``gguf-<type>``, bytes per block / elements per block):

=========  =====  =====  ======================================================================
type       block  bytes  layout (all little-endian)
=========  =====  =====  ======================================================================
q8_0        32     34    fp16 d, 32 x int8
q4_0        32     18    fp16 d, 16 bytes: element j in the low nibble, j+16 in the high one
q4_1        32     20    fp16 d, fp16 m, nibbles as q4_0
q5_0        32     22    fp16 d, uint32 of the 5th bits, nibbles as q4_0
q5_1        32     24    fp16 d, fp16 m, uint32 of the 5th bits, nibbles
q2_k       256     84    16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit codes, fp16 d, dmin
q3_k       256    110    32 bytes of high bits, 64 of 2-bit codes, 12 of 6-bit scales, fp16 d
q4_k       256    144    fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 nibble bytes
q5_k       256    176    as q4_k, with 32 bytes of 5th bits before the nibbles
q6_k       256    210    128 bytes low nibbles, 64 bytes 2-bit highs, 16 x int8 scales, fp16 d
mxfp4       32     17    E8M0 exponent, 16 bytes of E2M1 codes (j low, j+16 high)
tq1_0      256     54    48 + 4 bytes of base-3 digits (5 or 4 per byte), fp16 d
tq2_0      256     66    64 bytes of 2-bit digits, fp16 d
iq4_nl      32     18    fp16 d, nibbles as q4_0 indexing 16 non-uniform levels (kvalues_iq4nl)
iq4_xs     256    136    fp16 d, uint16 + 4 bytes of 6-bit block scales, 128 nibble bytes
=========  =====  =====  ======================================================================

A quantized tensor has one part, ``blocks``: uint8 ``[rows, row_bytes]``, which *is* the GGUF
tensor data (rows are the leading dimensions flattened), so an exporter writes it as it is and
``nbytes`` is the GGUF size. Encoding follows llama.cpp's reference quantizers
(``quantize_row_*_ref`` in ``ggml-quants.c``, mirrored by the ``gguf`` package's numpy
quantizers for the legacy, TQ and MXFP4 types): the legacy types round with the fp32 scale and
store it as fp16; Q4_K runs llama.cpp's scale/min search (``make_qkx2_quants``, 21 steps,
weights ``rms + |x|``) and Q6_K its scale search (``make_qx_quants``, 18 steps, weights ``x**2``),
both in fp32 with the reference's summation order. IQ4_NL and IQ4_XS run
``quantize_iq4_nl`` / ``quantize_iq4_xs`` (what ``ggml_quantize_chunk`` and ``llama-quantize``
call): a weighted search over 15 stretches of the level grid per block of 32, weights ``x**2``,
or with an importance matrix (``imatrix=``, one value per column: llama-imatrix's mean squared
activation) ``imatrix * sqrt(sigma2 + x**2)``; GPTQ passes its Hessian's diagonal. The K types
take one as ``quantize_row_q*_K_impl`` do (weighted sub-block searches, then ``make_qp_quants``
or ``make_qx_quants`` for the sub-block scales). Decoding is ``gguf.quants.dequantize``'s
arithmetic (fp32). ``tests/formats/test_gguf.py`` checks the bytes against ``gguf`` and, where it
has no quantizer (Q4_K, Q6_K), against llama.cpp's own through llama-cpp-python.

GGUF's MXFP4 is OCP MX's layout for the values (E8M0 scale ``2**(floor(log2 amax) - 2)``,
E2M1 element codes: sign bit 3, then e2m1), but packs element j with j+16 where joules'
``mxfp4`` packs 2i with 2i+1, and its rounding is "nearest, first code on ties" where OCP
rounds ties to even (1.75 -> 1.5 here, 2 in OCP; likewise 0.75 and 3.5) and a small negative
rounds to +0. Every ``mxfp4`` value is a GGUF MXFP4 value with the same exponent byte, so an
``mxfp4`` tensor repacks into GGUF losslessly (:func:`mxfp4_to_gguf_blocks`).

Rows must be a multiple of the block (32 or 256); llama.cpp falls back per tensor when they are
not (:data:`FALLBACK`: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, TQ -> Q4_0, IQ4_XS -> IQ4_NL),
and the error names that type.
GGUF blocks cannot hold NaN or Inf: such inputs are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from joules.errors import ConfigError
from joules.formats.base import (
    Fitted,
    Format,
    FormatConfig,
    QuantizedTensor,
    check_fit_input,
    check_input,
    check_qt,
    get,
    register,
    register_format,
)
from joules.formats.packing import unpack

QK_K = 256
# llama.cpp's per-tensor fallback when a row is not a multiple of 256 (llama-quant.cpp)
FALLBACK = {
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
    "tq1_0": "q4_0",
    "tq2_0": "q4_0",
    "iq4_xs": "iq4_nl",
}
_GROUP_MAX_EPS = 1e-15


def _f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 (round to nearest even, overflow to inf), as GGML_FP32_TO_FP16."""
    return x.to(torch.float16)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n, 1] fp16 -> [n, 2] little-endian bytes."""
    return x.reshape(-1).contiguous().view(torch.uint8).reshape(-1, 2)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1] fp32 value of the fp16 they hold."""
    return b.contiguous().view(torch.float16).float().reshape(-1, 1)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (gguf's ``np_roundf``)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _finite_or(v: torch.Tensor, q: torch.Tensor, fill: float) -> torch.Tensor:
    """``q`` where the scaled value ``v`` is finite, else the code llama.cpp's float->int cast of
    inf/NaN gives on x86-64 (``fill``). They arise only when a block's range is so small
    (subnormal) that ``1/d`` overflows to inf."""
    return torch.where(torch.isfinite(v), q, torch.full_like(v, fill))


def _trunc_code(v: torch.Tensor, qmax: int) -> torch.Tensor:
    """``MIN(qmax, (int8_t)v)`` as llama.cpp's Q4/Q5 quantizers compute it, clamped to
    ``[0, qmax]`` (values outside only come from a fitted grid, which clips); inf/NaN go through
    ``cvttss2si`` to INT_MIN, whose low byte is 0: code 0."""
    return _finite_or(v, torch.trunc(v).clamp(0, qmax), 0).to(torch.uint8)


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in fp32."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _div(k: float, t: torch.Tensor) -> torch.Tensor:
    """``k / t`` correctly rounded in fp32, as C divides: torch's ``number / tensor`` is
    ``reciprocal(t) * number``, two roundings, which moves llama.cpp's K-quant searches."""
    return torch.full_like(t, float(k)) / t


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right in fp32, as a C loop does (keepdim)."""
    tt = t.movedim(-1, 0).contiguous()  # contiguous rows: one fast add per element index
    acc = tt[0].clone()
    for i in range(1, tt.shape[0]):
        acc.add_(tt[i])
    return acc.unsqueeze(-1)


def _seqsum0(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 (contiguous rows) in order, as a C loop ``float s = 0; s += t[i]`` does:
    [1, ...]. The accumulator starts at +0, so a sum of negative zeros is +0 (IEEE: 0 + -0 = +0):
    an IQ4_NL block whose only weighted values are -0 stores the scale +0, as llama.cpp does."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc.unsqueeze(0)


def _first_equal(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The first element of each row equal to ``v`` ([n, 1]): the sign of a zero min/max as
    a C loop ``if (x[i] < min) min = x[i]`` finds it (torch's amin may return either zero)."""
    i = (x == v).to(torch.uint8).argmax(dim=1, keepdim=True)
    return torch.gather(x, 1, i)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 2h] 4-bit codes -> [n, h] bytes: element j low, j+h high."""
    h = q.shape[1] // 2
    return q[:, :h] | (q[:, h:] << 4)


def _unnibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=1)


def _bits_u32(bits: torch.Tensor) -> torch.Tensor:
    """[n, 32] of 0/1 -> [n, 4] bytes of the little-endian uint32 with bit i = bits[:, i]."""
    w = (1 << torch.arange(8, dtype=torch.int32)).reshape(1, 1, 8)
    return (bits.to(torch.int32).reshape(-1, 4, 8) * w).sum(-1).to(torch.uint8)


def _u32_bits(b: torch.Tensor) -> torch.Tensor:
    sh = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8)
    return ((b.reshape(-1, 4, 1) >> sh) & 1).reshape(-1, 32)


# --------------------------------------------------------------------------------------------
# Block types: fit (block parameters), codes (rounding with fixed parameters), pack/unpack, decode
# --------------------------------------------------------------------------------------------


class BlockType:
    """One GGUF block type. ``x`` is fp32 ``[nb, block]``; parameters are ``[nb, k]`` tensors.

    ``fit`` returns the stored parameters plus what the reference quantizer rounds with (the
    unrounded fp32 scale of the legacy types), and, for the K-quants, ``L``: the codes of its
    search, kept where a sub-block's stored scale is 0 (the reference leaves them as found).
    """

    name: str = ""
    block: int = 32
    type_size: int = 0
    # True where llama.cpp's quantizer searches its scales weighted by an importance matrix
    # and joules does the same: ``search_weights`` turns the imatrix into the search's weights
    weighted: bool = False

    def search_weights(self, x: torch.Tensor, qw: torch.Tensor, per_row: int) -> torch.Tensor:
        """The weights llama.cpp's search gives each element of ``x`` [nb, block] (rows of
        ``per_row`` blocks) from ``qw`` (the imatrix value of each element's column)."""
        raise NotImplementedError

    def fit(self, x: torch.Tensor, w: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Block parameters of ``x``; ``w``: :meth:`search_weights` (weighted types only)."""
        raise NotImplementedError

    def codes(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, q: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, b: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class _Sym(BlockType):
    """Q4_0 / Q5_0: d = (signed max-magnitude element) / -2**(b-1), code trunc(x/d + off + .5).

    With an importance matrix llama.cpp runs ``quantize_row_q{4,5}_0_impl`` instead: the scale
    from ``make_qx_quants`` (19 grid stretches, weights ``imatrix * sqrt(sigma2 + x**2)``,
    ``sigma2`` the row's mean square), codes rounded with the best stretch's inverse scale."""

    weighted = True

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits
        self.half = 1 << (bits - 1)
        self.type_size = 2 + (4 if bits == 5 else 0) + 16

    def search_weights(self, x, qw, per_row):
        ss = _row_sumsq(x, per_row)
        sigma2 = ss / torch.full_like(ss, float(per_row * self.block))  # sum_x2 / n_per_row
        return qw * _root(sigma2 + x * x)

    def fit(self, x, w=None):
        if w is not None:
            scale, _, iscale, zero = _make_qx(x, self.half, w)
            return {"d": _f16(scale), "is": iscale, "zero": zero}
        imax = x.abs().argmax(dim=1, keepdim=True)  # first of equal magnitudes, as the C loop
        mx = torch.gather(x, 1, imax)
        mx = torch.where(mx == 0, torch.zeros_like(mx), mx)  # C keeps its initial +0 max
        d = mx / -self.half
        return {"d": _f16(d), "id": _inv(d)}

    def codes(self, x, p):
        if "is" in p:  # the weighted search's rounding; an all-(near-)zero block is all 0s
            q = _nearest_int(p["is"] * x).clamp_(-self.half, self.half - 1) + self.half
            return torch.where(p["zero"], torch.zeros_like(q), q).to(torch.uint8)
        return _trunc_code(x * p["id"] + (self.half + 0.5), 2 * self.half - 1)

    def decode(self, q, p):
        return p["d"].float() * (q.to(torch.float32) - self.half)

    def pack(self, q, p):
        out = [_f16_bytes(p["d"])]
        if self.bits == 5:
            out.append(_bits_u32(q >> 4))
        out.append(_nibbles(q & 0x0F))
        return torch.cat(out, dim=1)

    def unpack(self, b):
        d = _bytes_f16(b[:, :2]).half()
        if self.bits == 5:
            q = _unnibbles(b[:, 6:]) | (_u32_bits(b[:, 2:6]) << 4)
        else:
            q = _unnibbles(b[:, 2:])
        return q, {"d": d}


class _Asym(BlockType):
    """Q4_1 / Q5_1: d = (max - min) / (2**b - 1), m = min, code trunc((x - min)/d + .5)."""

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits
        self.qmax = (1 << bits) - 1
        self.type_size = 4 + (4 if bits == 5 else 0) + 16

    def fit(self, x):
        lo, hi = (
            _first_equal(x, x.amin(dim=1, keepdim=True)),
            _first_equal(x, x.amax(dim=1, keepdim=True)),
        )
        d = (hi - lo) / self.qmax
        return {"d": _f16(d), "m": _f16(lo), "id": _inv(d), "min": lo}

    def codes(self, x, p):
        return _trunc_code((x - p["min"]) * p["id"] + 0.5, self.qmax)

    def decode(self, q, p):
        return p["d"].float() * q.to(torch.float32) + p["m"].float()

    def pack(self, q, p):
        out = [_f16_bytes(p["d"]), _f16_bytes(p["m"])]
        if self.bits == 5:
            out.append(_bits_u32(q >> 4))
        out.append(_nibbles(q & 0x0F))
        return torch.cat(out, dim=1)

    def unpack(self, b):
        d, m = _bytes_f16(b[:, :2]).half(), _bytes_f16(b[:, 2:4]).half()
        if self.bits == 5:
            q = _unnibbles(b[:, 8:]) | (_u32_bits(b[:, 4:8]) << 4)
        else:
            q = _unnibbles(b[:, 4:])
        return q, {"d": d, "m": m}


class _Q8_0(BlockType):
    """Q8_0: d = amax / 127, code roundf(x / d) (half away from zero) as int8."""

    name, type_size = "q8_0", 34

    def fit(self, x):
        d = x.abs().amax(dim=1, keepdim=True) / 127
        return {"d": _f16(d), "id": _inv(d)}

    def codes(self, x, p):  # int8 codes stored as their uint8 bytes
        v = x * p["id"]  # (int8_t) of inf/NaN: 0
        return _finite_or(v, _roundf(v).clamp(-127, 127), 0).to(torch.int8).view(torch.uint8)

    def decode(self, q, p):
        return q.view(torch.int8).to(torch.float32) * p["d"].float()

    def pack(self, q, p):
        return torch.cat([_f16_bytes(p["d"]), q], dim=1)

    def unpack(self, b):
        return b[:, 2:].contiguous(), {"d": _bytes_f16(b[:, :2]).half()}


class _MXFP4(BlockType):
    """GGUF MXFP4: e = floor(log2 amax) - 2 + 127, element = nearest of the 16 E2M1 codes."""

    name, type_size = "mxfp4", 17
    KVALUES = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12])

    @staticmethod
    def half_scale(e: torch.Tensor) -> torch.Tensor:
        """ggml_e8m0_to_fp32_half: 2**(e - 128) (e < 2 as fp32 subnormals)."""
        e = e.to(torch.int32)
        bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
        return bits.view(torch.float32)

    def fit(self, x):
        amax = x.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        e = (torch.floor(torch.log2(safe)) - 2 + 127).to(torch.int64)
        # amax < 2**-125 makes e negative; llama.cpp's (uint8_t) cast keeps its low byte on
        # x86-64 (e.g. 241 for -15): a huge scale, so every code is 0 and the block decodes to 0
        e = torch.where(amax > 0, e & 0xFF, torch.zeros_like(e))
        return {"e": e.to(torch.uint8)}

    def codes(self, x, p):
        d = self.half_scale(p["e"]).unsqueeze(-1)  # [nb, 1, 1]
        err = (d * self.KVALUES.float() - x.unsqueeze(-1)).abs()
        return err.argmin(dim=-1).to(torch.uint8)  # first of equal errors, as the C loop

    def decode(self, q, p):
        return self.half_scale(p["e"]) * self.KVALUES.float()[q.long()]

    def pack(self, q, p):
        return torch.cat([p["e"], _nibbles(q)], dim=1)

    def unpack(self, b):
        return _unnibbles(b[:, 1:]), {"e": b[:, :1].contiguous()}


class _TQ(BlockType):
    """TQ1_0 / TQ2_0: ternary, d = amax (fp16), digit roundf(x / d) + 1 in {0, 1, 2}."""

    block = QK_K

    def __init__(self, name: str):
        self.name = name
        self.type_size = 54 if name == "tq1_0" else 66

    def fit(self, x):
        d = x.abs().amax(dim=1, keepdim=True)
        return {"d": _f16(d), "id": _inv(d)}

    def codes(self, x, p):
        v = x * p["id"]  # lroundf(inf/NaN) is LONG_MIN on glibc; (int)(LONG_MIN + 1) is digit 1
        return _finite_or(v, _roundf(v).clamp(-1, 1) + 1, 1).to(torch.uint8)

    def decode(self, q, p):
        return p["d"].float() * (q.to(torch.float32) - 1)

    def pack(self, q, p):
        n = q.shape[0]
        qi = q.to(torch.int32)
        if self.name == "tq2_0":
            qs = qi.reshape(n, 2, 4, 32) << torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)
            qs = qs.sum(dim=2).reshape(n, 64)
            return torch.cat([qs.to(torch.uint8), _f16_bytes(p["d"])], dim=1)
        p5 = torch.tensor([81, 27, 9, 3, 1]).reshape(1, 1, 5, 1)
        qs0 = (qi[:, :160].reshape(n, 1, 5, 32) * p5).sum(2).reshape(n, 32)
        qs1 = (qi[:, 160:240].reshape(n, 1, 5, 16) * p5).sum(2).reshape(n, 16)
        qh = (qi[:, 240:].reshape(n, 1, 4, 4) * p5[:, :, :4]).sum(2).reshape(n, 4)
        v = torch.cat([qs0, qs1, qh], dim=1)
        v = (v * 256 + 242) // 243  # base-3 fraction, rounded up into a byte
        return torch.cat([v.to(torch.uint8), _f16_bytes(p["d"])], dim=1)

    def unpack(self, b):
        n = b.shape[0]
        d = _bytes_f16(b[:, -2:]).half()
        if self.name == "tq2_0":
            sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
            q = (b[:, :64].reshape(n, 2, 1, 32) >> sh) & 3
            return q.reshape(n, 256), {"d": d}
        pw = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32).reshape(1, 1, 5, 1)
        bi = b[:, :52].to(torch.int32)
        q0 = ((bi[:, :32].reshape(n, 1, 1, 32) * pw) & 0xFF).reshape(n, 160)
        q1 = ((bi[:, 32:48].reshape(n, 1, 1, 16) * pw) & 0xFF).reshape(n, 80)
        qh = ((bi[:, 48:52].reshape(n, 1, 1, 4) * pw[:, :, :4]) & 0xFF).reshape(n, 16)
        v = torch.cat([q0, q1, qh], dim=1)
        return ((v * 3) >> 8).to(torch.uint8), {"d": d}


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int, its very bit trick: add 1.5 * 2**23 in fp32 and read the low
    mantissa bits. Round half to even for |x| < 2**22; out of that range (inf from a subnormal
    range) it returns what the C code returns, not a clamped value."""
    bits = (x.float() + 12582912.0).view(torch.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).float()


def _make_qkx2(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    mad: bool = False,
):
    """llama.cpp's make_qkx2_quants over sub-blocks x [S, n] with weights w: (scale, -min, L);
    ``mad``: the error is the weighted absolute difference (``use_mad``, Q2_K), else squared.

    Runs on the transposes [n, S], so each left-to-right sum is n contiguous vector adds."""
    x, w = x.t().contiguous(), w.t().contiguous()
    lo = torch.minimum(x.amin(dim=0, keepdim=True), torch.zeros(1))
    hi = x.amax(dim=0, keepdim=True)
    flat = hi == lo
    rng = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w, sum_x = _seqsum0(w), _seqsum0(w * x)
    iscale = _div(nmax, rng)
    scale = 1 / iscale
    L = _nearest_int(iscale * (x - lo)).clamp_(0, nmax)
    diff = scale * L + lo - x
    best = _seqsum0(w * (diff.abs() if mad else diff * diff))
    mn = lo.clone()
    for step in range(nstep + 1):
        # (rdelta * is + rmin + nmax) in fp32, as C evaluates it
        # the C loop moves `min` to each better fit's minimum, and later steps use it
        cur_rng = torch.where(flat, torch.ones_like(hi), hi - mn)
        iscale = ((torch.tensor(rdelta) * step + rmin) + nmax) / cur_rng
        la = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seqsum0(wl), _seqsum0(wl * la), _seqsum0(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        ts = (sum_w * sum_xl - sum_x * sum_l) / Ds
        tm = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = tm > 0
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        ts = torch.where(
            pos, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2), ts
        )
        diff = ts * la + tm - x
        cur = _seqsum0(w * (diff.abs() if mad else diff * diff))
        better = ok & (cur < best) & ~flat
        L = torch.where(better, la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, ts, scale)
        mn = torch.where(better, tm, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale.t(), -mn.t(), L.t()


def _row_sumsq(x: torch.Tensor, per_row: int) -> torch.Tensor:
    """The sum of squares of each row of ``per_row`` blocks of ``x`` (left to right in fp32, as
    llama.cpp's loop adds), repeated for each block of the row: [nb, 1]."""
    rows = x.reshape(-1, per_row * x.shape[1])
    return _seqsum(rows * rows).repeat_interleave(per_row, dim=0)


def _root(v: torch.Tensor) -> torch.Tensor:
    """C's correctly rounded ``sqrtf`` (torch's fp32 sqrt can be an ulp off: round from fp64)."""
    return torch.sqrt(v.double()).float()


def _signed_max(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of ``xt`` [n, S] (sub-blocks transposed): the first element of largest
    magnitude (C's ``if (ax > amax)`` loop), whether the column is all (near-)zero
    (< GROUP_MAX_EPS), and that maximum with 1 in place of zero columns (safe to divide by):
    three [1, S] tensors."""
    imax = xt.abs().argmax(dim=0, keepdim=True)
    mx = torch.gather(xt, 0, imax)
    zero = mx.abs() < _GROUP_MAX_EPS
    return mx, zero, torch.where(zero, torch.ones_like(mx), mx)


# GGUFFormat fits and rounds at most this many elements (whole rows) at once (_row_chunks).
_FIT_CHUNK_ELEMS = 1 << 20


def _make_qx(
    x: torch.Tensor, nmax: int, w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants with rmse_type=1 over x [S, n]: weights ``w`` (the importance
    matrix's), else x**2. (scale, L, the inverse scale L was rounded with, all-zero mask)."""
    x = x.t().contiguous()  # [n, S], as in _make_qkx2
    _, zero, mxs = _signed_max(x)
    w = x * x if w is None else w.t().contiguous()

    def attempt(iscale):
        lq = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        sumlx, suml2 = _seqsum0(w * x * lq), _seqsum0(w * lq * lq)
        return lq, sumlx, suml2

    best_is = _div(-nmax, mxs)
    L, sumlx, suml2 = attempt(best_is)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in list(range(-9, 0)) + list(range(1, 10)):
        iscale = -(nmax + torch.tensor(0.1) * step) / mxs
        lq, sumlx, suml2 = attempt(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, lq, L)
        best_is = torch.where(better, iscale, best_is)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale.t(), L.t(), best_is.reshape(-1, 1), zero.reshape(-1, 1)


def _min_codes(x: torch.Tensor, p: dict[str, torch.Tensor], subs: int, nmax: int) -> torch.Tensor:
    """Codes of the K types with mins (Q2_K, Q4_K, Q5_K) over ``subs`` sub-blocks of a 256-block:
    ``nearest_int((x + dm) / ds)`` in [0, nmax]; a sub-block whose ds is 0 keeps its search's
    codes (the reference skips it)."""
    n, size = x.shape[0], QK_K // subs
    ds = p["ds"]
    q = _nearest_int((x.reshape(n, subs, size) + p["dm"]) / torch.where(ds == 0, 1.0, ds))
    q = q.clamp_(0, nmax).to(torch.uint8)
    keep = p["L"].reshape(n, subs, size) if "L" in p else torch.zeros_like(q)
    return torch.where(ds == 0, keep, q).reshape(n, QK_K)


def _min_decode(q: torch.Tensor, p: dict[str, torch.Tensor], subs: int) -> torch.Tensor:
    n = q.shape[0]
    return (p["ds"] * q.reshape(n, subs, QK_K // subs).float() - p["dm"]).reshape(n, QK_K)


def _make_qp(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qp_quants(n, nmax, x, L, quant_weights) over rows x [B, n] (the
    sub-block scales or mins of B blocks) with weights qw [B, n]: nine stretches of the max-based
    scale, then up to 5 passes of per-element coordinate descent, element by element in C's
    order. (scale [B, 1], L [B, n] as the uint8 bytes C stores)."""
    mx = torch.clamp(x.amax(dim=1, keepdim=True), min=0.0)  # C: max = 0, then MAX(max, x[i])
    zero = mx < _GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    xt, wt = x.t().contiguous(), qw.t().contiguous()  # [n, B]: sums run over dim 0

    def mse(iscale: torch.Tensor, clamp: bool) -> torch.Tensor:
        lq = _nearest_int(iscale.t() * xt)
        # the first pass stores L[i] = nearest_int(...) as a uint8 and reads it back
        lq = lq.clamp(max=nmax) if clamp else (lq.to(torch.int64) & 0xFF).float()
        diff = xt - _div(1, iscale).t() * lq
        return _seqsum0(wt * diff * diff)

    iscale = _div(nmax, mxs)
    best = mse(iscale, clamp=False)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (torch.tensor(0.1) * step + nmax) / mxs
        err = mse(cand, clamp=True)
        better = err < best  # [1, B]
        best = torch.where(better, err, best)
        iscale = torch.where(better.t(), cand, iscale)
    lq = _nearest_int(iscale.t() * xt).clamp(max=nmax)  # [n, B]: the int l of C's last pass
    wx = wt * xt
    sumlx, suml2 = _seqsum0(wx * lq), _seqsum0(wt * lq * lq)
    L = (lq.to(torch.int64) & 0xFF).float()  # L[i] = l: a uint8
    for _ in range(5):  # a pass that changes nothing leaves the next one nothing to change
        for i in range(xt.shape[0]):
            li, wi, wxi, xi = L[i], wt[i], wx[i], xt[i]
            slx = sumlx[0] - wxi * li
            sl2 = suml2[0] - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = _nearest_int(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(max=nmax)
            slx2 = slx + wxi * new
            sl22 = sl2 + wi * new * new
            ok &= (new != li) & (slx2 * slx2 * suml2[0] > sumlx[0] * sumlx[0] * sl22)
            L[i] = torch.where(ok, (new.to(torch.int64) & 0xFF).float(), li)
            sumlx[0] = torch.where(ok, slx2, sumlx[0])
            suml2[0] = torch.where(ok, sl22, suml2[0])
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0).t()
    L = torch.where(zero.t(), torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L.t().to(torch.uint8)


def _sigma_weights(x: torch.Tensor, qw: torch.Tensor, factor: int) -> torch.Tensor:
    """The K types' imatrix search weights ``qw * sqrt(sigma2 + x**2)`` over blocks x [nb, 256],
    sigma2 = ``factor * sum_x2 / QK_K`` per block as ``quantize_row_q*_K_impl`` computes it
    (factor 2 for Q3_K/Q4_K/Q5_K, 1 for Q2_K)."""
    ss = _seqsum(x * x)
    return qw * _root(factor * ss / torch.full_like(ss, float(QK_K)) + x * x)


def _k4_header(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of Q4_K/Q5_K's 6-bit scales and mins [n, 8] (uint8, as C stores them)."""
    n = sc.shape[0]
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    s = torch.zeros(n, 12, dtype=torch.int32)
    s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return (s & 0xFF).to(torch.uint8)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sc, m) [n, 8] as get_scale_min_k4 reads them from the 12 bytes ``s`` [n, 12]."""
    s = s.reshape(-1, 3, 4)
    a, mm, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    m = torch.cat([mm & 0x3F, (md >> 4) | ((mm >> 2) & 0x30)], dim=1)
    return sc, m


class _Q4_K(BlockType):
    """Q4_K: 8 sub-blocks of 32, x = d*sc*q - dmin*m with 6-bit sc, m and fp16 d, dmin. With an
    importance matrix, quantize_row_q4_K_impl: make_qkx3_quants weighted by
    ``imatrix * sqrt(sigma2 + x**2)`` (sigma2: twice the block's mean square), then the 6-bit
    scales and mins by make_qp_quants weighted by each sub-block's summed weights."""

    name, block, type_size = "q4_k", QK_K, 144
    # make_qkx2_quants(32, nmax, ..., rmin, 0.1, nstep) as quantize_row_q4_K_ref calls it
    nmax, rmin, nstep = 15, -1.0, 20
    weighted = True
    clamp63 = False  # the impl stores make_qp_quants' bytes as they are (Q5_K clamps to 63)

    def search_weights(self, x, qw, per_row):
        return _sigma_weights(x, qw, 2)

    def _fit_weighted(self, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        xs, ws = x.reshape(n * 8, 32), w.reshape(n * 8, 32)
        # make_qkx3_quants with weights is make_qkx2_quants (nmax, -0.9, 0.05, 36)
        scales, mins, L = _make_qkx2(xs, ws, self.nmax, -0.9, 0.05, 36)
        sw = _seqsum(ws).reshape(n, 8)
        d, ls = _make_qp(scales.reshape(n, 8), 63, sw)
        dmin, lm = _make_qp(mins.reshape(n, 8), 63, sw)
        if self.clamp63:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        sc, m = _k4_scales(_k4_header(ls, lm))  # what the decoder reads back
        return self._params(_f16(d), _f16(dmin), sc, m, L.reshape(n, 256))

    def fit(self, x, w=None):
        if w is not None:
            return self._fit_weighted(x, w)
        n = x.shape[0]
        xs = x.reshape(n * 8, 32)
        # sqrtf is correctly rounded; torch's fp32 sqrt can be an ulp off: round from fp64
        av = _root(_seqsum(xs * xs) / 32)
        scales, mins, L = _make_qkx2(xs, av + xs.abs(), self.nmax, self.rmin, 0.1, self.nstep)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        zeros = torch.zeros(n, 1)
        # C: `if (scale > max_scale)` from +0, so the result is never -0
        max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
        max_scale = torch.where(max_scale > 0, max_scale, zeros)
        max_min = torch.where(max_min > 0, max_min, zeros)
        inv_s = torch.where(
            max_scale > 0, _div(63, torch.where(max_scale > 0, max_scale, 1.0)), 0.0
        )
        inv_m = torch.where(max_min > 0, _div(63, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        # uint8 ls = nearest_int(...): the int wraps into a byte, then MIN(63, ls)
        ls = (_nearest_int(inv_s * scales).to(torch.int64) & 0xFF).clamp_(max=63)
        lm = (_nearest_int(inv_m * mins).to(torch.int64) & 0xFF).clamp_(max=63)
        d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
        return self._params(d, dmin, ls.to(torch.uint8), lm.to(torch.uint8), L.reshape(n, 256))

    @staticmethod
    def _params(d, dmin, sc, m, L=None):
        p = {"d": d, "dmin": dmin, "sc": sc, "m": m}
        # the fp32 values the reference rounds with and gguf decodes with: [n, 8, 1]
        p["ds"] = (d.float() * sc.float()).unsqueeze(-1)
        p["dm"] = (dmin.float() * m.float()).unsqueeze(-1)
        if L is not None:
            p["L"] = L.to(torch.uint8)
        return p

    def codes(self, x, p):
        return _min_codes(x, p, 8, self.nmax)

    def decode(self, q, p):
        return _min_decode(q, p, 8)

    def pack(self, q, p):
        head = [_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), _k4_header(p["sc"], p["m"])]
        return torch.cat([*head, *self._pack_codes(q)], dim=1)

    @staticmethod
    def _pack_codes(q: torch.Tensor) -> list[torch.Tensor]:
        """128 bytes: sub-block 2c in the low nibbles of bytes 32c..32c+31, 2c+1 in the high."""
        qs = q.reshape(-1, 4, 2, 32) & 0x0F
        return [(qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(-1, 128)]

    @staticmethod
    def _unpack_codes(b: torch.Tensor) -> torch.Tensor:
        qs = b.reshape(-1, 4, 1, 32)
        return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256)

    def unpack(self, b):
        sc, m = _k4_scales(b[:, 4:16])
        q = self._unpack_codes(b[:, 16:])
        d, dmin = _bytes_f16(b[:, 0:2]).half(), _bytes_f16(b[:, 2:4]).half()
        return q, self._params(d, dmin, sc, m)


class _Q2_K(BlockType):
    """Q2_K: 16 sub-blocks of 16, x = d*sc*q - dmin*m with 4-bit sc, m (one byte each, sc low)
    and fp16 d, dmin; 2-bit codes. The reference search is make_qkx2_quants with weights |x|
    and the absolute error (``use_mad``)."""

    name, block, type_size = "q2_k", QK_K, 84
    weighted = True

    def search_weights(self, x, qw, per_row):
        return _sigma_weights(x, qw, 1)

    def fit(self, x, w=None):
        n = x.shape[0]
        xs = x.reshape(n * 16, 16)
        if w is not None:  # make_qkx3_quants (squared error), then make_qp_quants to 4 bits
            ws = w.reshape(n * 16, 16)
            scales, mins, L = _make_qkx2(xs, ws, 3, -0.9, 0.05, 36)
            sw = _seqsum(ws).reshape(n, 16)
            dm, ls = _make_qp(scales.reshape(n, 16), 15, sw)
            mm, lm = _make_qp(mins.reshape(n, 16), 15, sw)
            byte = (ls.to(torch.int64) | (lm.to(torch.int64) << 4)) & 0xFF
            return self._params(_f16(dm), _f16(mm), byte.to(torch.uint8), L.reshape(n, 256))
        scales, mins, L = _make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        zeros = torch.zeros(n, 1)
        max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
        max_scale = torch.where(max_scale > 0, max_scale, zeros)  # C: `>` from +0
        max_min = torch.where(max_min > 0, max_min, zeros)
        ones = torch.ones_like(max_scale)
        inv_s = torch.where(max_scale > 0, _div(15, torch.where(max_scale > 0, max_scale, ones)), 0)
        inv_m = torch.where(max_min > 0, _div(15, torch.where(max_min > 0, max_min, ones)), 0)
        ls = _nearest_int(inv_s * scales).to(torch.int64)
        lm = _nearest_int(inv_m * mins).to(torch.int64)
        byte = (ls | (lm << 4)) & 0xFF  # uint8 scales[j] = ls; scales[j] |= lm << 4
        fifteen = torch.full_like(max_scale, 15.0)
        d, dmin = _f16(max_scale / fifteen), _f16(max_min / fifteen)
        return self._params(d, dmin, byte.to(torch.uint8), L.reshape(n, 256))

    @staticmethod
    def _params(d, dmin, sc, L=None):
        p = {"d": d, "dmin": dmin, "sc": sc}
        p["ds"] = (d.float() * (sc & 0xF).float()).unsqueeze(-1)  # [n, 16, 1]
        p["dm"] = (dmin.float() * (sc >> 4).float()).unsqueeze(-1)
        if L is not None:
            p["L"] = L.to(torch.uint8)
        return p

    def codes(self, x, p):
        return _min_codes(x, p, 16, 3)

    def decode(self, q, p):
        return _min_decode(q, p, 16)

    def pack(self, q, p):
        n = q.shape[0]
        qs = q.reshape(n, 2, 4, 32).to(torch.int32)  # [half, quarter, l]: element 128h + 32k + l
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
        qs = (qs << sh).sum(dim=2).reshape(n, 64).to(torch.uint8)
        return torch.cat([p["sc"], qs, _f16_bytes(p["d"]), _f16_bytes(p["dmin"])], dim=1)

    def unpack(self, b):
        n = b.shape[0]
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
        q = ((b[:, 16:80].reshape(n, 2, 1, 32) >> sh) & 3).reshape(n, 256)
        d, dmin = _bytes_f16(b[:, 80:82]).half(), _bytes_f16(b[:, 82:84]).half()
        return q, self._params(d, dmin, b[:, :16].contiguous())


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_q3_quants(n, nmax, x, L, do_rmse=true) over sub-blocks x [S, n]: the
    max-based codes, then up to 5 passes of per-element coordinate descent on the weighted
    (x**2) least-squares fit, element by element in C's order. (scale [S, 1], L [S, n] in
    [0, 2 nmax))."""
    xt = x.t().contiguous()  # [n, S]
    _, zero, mxs = _signed_max(xt)
    zero = zero.reshape(-1)
    iscale = _div(-nmax, mxs)
    L = _nearest_int(iscale * xt).clamp_(-nmax, nmax - 1)  # [n, S]
    w = xt * xt
    wx = w * xt
    sumlx = _seqsum0(wx * L).reshape(-1)
    suml2 = _seqsum0(w * L * L).reshape(-1)
    for _ in range(5):  # a pass that changes nothing leaves the next one nothing to change
        for i in range(xt.shape[0]):
            li, wi, wxi, xi = L[i], w[i], wx[i], xt[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new = _nearest_int(xi * sl2 / torch.where(pos, slx, 1.0)).clamp_(-nmax, nmax - 1)
            slx2 = slx + wxi * new
            sl22 = sl2 + wi * new * new
            ok = pos & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(ok, new, li)
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(L), L + nmax)
    return scale.reshape(-1, 1), L.t()


class _Sub16(BlockType):
    """The K types without mins (Q3_K, Q6_K): 16 sub-blocks of 16, x = ds * (q - offset), ``ds``
    the fp32 product of fp16 d and the sub-block's integer scale; codes round with it, and a
    sub-block whose ds is 0 keeps its search's codes (the reference skips it)."""

    block, offset = QK_K, 0

    def codes(self, x, p):
        n, o = x.shape[0], self.offset
        ds = p["ds"]
        q = _nearest_int(x.reshape(n, 16, 16) / torch.where(ds == 0, torch.ones_like(ds), ds))
        q = (q.clamp_(-o, o - 1) + o).to(torch.uint8)
        keep = p["L"].reshape(n, 16, 16) if "L" in p else torch.full_like(q, o)
        return torch.where(ds == 0, keep, q).reshape(n, 256)

    def decode(self, q, p):
        n = q.shape[0]
        return (p["ds"] * (q.reshape(n, 16, 16).float() - self.offset)).reshape(n, 256)


class _Q3_K(_Sub16):
    """Q3_K: 16 sub-blocks of 16, x = d * (sc - 32) * (q - 4) with 6-bit sc and fp16 d; the
    3-bit codes as 2 low bits (qs) and a high-bit mask (hmask)."""

    name, type_size, offset = "q3_k", 110, 4
    weighted = True

    def search_weights(self, x, qw, per_row):
        return _sigma_weights(x, qw, 2)

    def fit(self, x, w=None):
        n = x.shape[0]
        if w is not None:  # quantize_row_q3_K_impl: make_qx_quants for codes and for scales
            ws = w.reshape(n * 16, 16)
            scales, L, _, _ = _make_qx(x.reshape(n * 16, 16), 4, ws)
            sw = _seqsum(ws).reshape(n, 16)
            d, ls, _, _ = _make_qx(scales.reshape(n, 16), 32, sw)
            return self._params(_f16(d), ls.to(torch.uint8), L.reshape(n, 256))
        scales, L = _make_q3(x.reshape(n * 16, 16), 4)
        scales, L = scales.reshape(n, 16), L.reshape(n, 256)
        imax = scales.abs().argmax(dim=1, keepdim=True)  # the first of largest magnitude
        big = torch.gather(scales, 1, imax)
        max_scale = torch.where(big.abs() > 0, big, torch.zeros_like(big))
        nz = max_scale != 0
        iscale = torch.where(nz, _div(-32, torch.where(nz, max_scale, 1.0)), 0.0)
        ls = (_nearest_int(iscale * scales).clamp_(-32, 31) + 32).to(torch.int64)
        ls = torch.where(nz, ls, torch.zeros_like(ls))  # memset(scales, 0) when max_scale == 0
        d = torch.where(nz, _f16(_div(1, torch.where(nz, iscale, 1.0))).float(), 0.0).half()
        return self._params(d, ls.to(torch.uint8), L, nz)

    @staticmethod
    def _params(d, ls, L=None, nz=None):
        sc = ls.to(torch.int32) - 32
        if nz is not None:  # a block with max_scale == 0 stores all-zero scale bytes
            sc = torch.where(nz, sc, torch.zeros_like(sc))
        p = {"d": d, "ls": ls, "ds": (d.float() * sc.float()).unsqueeze(-1)}
        if L is not None:
            p["L"] = L.to(torch.uint8)
        return p

    def pack(self, q, p):
        n = q.shape[0]
        hi = (q >> 2).to(torch.int32).reshape(n, 8, 32)  # bit b of hmask[m]: element 32b + m
        hmask = (hi << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(dim=1)
        lo = (q & 3).to(torch.int32).reshape(n, 2, 4, 32)
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
        qs = (lo << sh).sum(dim=2).reshape(n, 64)
        ls = p["ls"].to(torch.int32)
        sc = torch.zeros(n, 12, dtype=torch.int32)
        sc[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
        hb = (ls >> 4) & 3  # [n, 16]: bits 2*(j//4) of byte 8 + j%4
        for k in range(4):
            sc[:, 8 + k] = (
                hb[:, k] | (hb[:, 4 + k] << 2) | (hb[:, 8 + k] << 4) | (hb[:, 12 + k] << 6)
            )
        parts = [hmask.to(torch.uint8), qs.to(torch.uint8), sc.to(torch.uint8)]
        return torch.cat([*parts, _f16_bytes(p["d"])], dim=1)

    def unpack(self, b):
        n = b.shape[0]
        hm = b[:, :32].reshape(n, 1, 32)
        hi = (hm >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
        lo = ((b[:, 32:96].reshape(n, 2, 1, 32) >> sh) & 3).reshape(n, 256)
        q = lo | (hi.reshape(n, 256) << 2)
        sc = b[:, 96:108].to(torch.int32)
        low = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], dim=1)  # j < 8, then j >= 8
        j = torch.arange(16)
        high = (sc[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        ls = (low | (high << 4)).to(torch.uint8)
        return q, self._params(_bytes_f16(b[:, 108:110]).half(), ls)


class _Q5_K(_Q4_K):
    """Q5_K: Q4_K's layout with 5-bit codes: the fifth bits of all 256 in 32 bytes ``qh``
    (bit i of byte j: element 32i + j) before the 128 nibble bytes."""

    name, type_size = "q5_k", 176
    nmax, rmin, nstep = 31, -0.5, 15
    clamp63 = True

    @staticmethod
    def _pack_codes(q: torch.Tensor) -> list[torch.Tensor]:
        hi = (q >> 4).reshape(-1, 8, 32).to(torch.int32)  # [n, sub-block i, j]
        qh = (hi << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(dim=1)
        return [qh.to(torch.uint8), *_Q4_K._pack_codes(q)]

    @staticmethod
    def _unpack_codes(b: torch.Tensor) -> torch.Tensor:
        qh, lo = b[:, :32], _Q4_K._unpack_codes(b[:, 32:])
        hi = (qh.reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
        return lo | (hi.reshape(-1, 256) << 4)


class _Q6_K(_Sub16):
    """Q6_K: 16 sub-blocks of 16, x = d * sc * (q - 32) with int8 sc and fp16 d, no mins."""

    name, type_size, offset = "q6_k", 210, 32
    weighted = True  # quantize_row_q6_K_impl: make_qx_quants weighted by the imatrix itself

    def search_weights(self, x, qw, per_row):
        return qw

    def fit(self, x, w=None):
        n = x.shape[0]
        ws = None if w is None else w.reshape(n * 16, 16)
        scales, L, _, _ = _make_qx(x.reshape(n * 16, 16), 32, ws)
        scales = scales.reshape(n, 16)
        imax = scales.abs().argmax(dim=1, keepdim=True)
        max_scale = torch.gather(scales, 1, imax)
        zero = max_scale.abs() < _GROUP_MAX_EPS
        iscale = _div(-128, torch.where(zero, torch.ones_like(max_scale), max_scale))
        d = torch.where(zero, torch.zeros_like(iscale), _f16(1 / iscale).float()).half()
        sc = _nearest_int(iscale * scales).clamp_(max=127)
        sc = torch.where(zero, torch.zeros_like(sc), sc).to(torch.int8)
        L = torch.where(zero, torch.zeros_like(L.reshape(n, 256)), L.reshape(n, 256))
        return self._params(d, sc, L)

    @staticmethod
    def _params(d, sc, L=None):
        p = {"d": d, "sc": sc, "ds": (d.float() * sc.float()).unsqueeze(-1)}
        if L is not None:
            p["L"] = L.to(torch.uint8)
        return p

    def pack(self, q, p):
        n = q.shape[0]
        L = q.reshape(n, 2, 4, 32)  # [half, quarter, l]: element 128*h + 32*k + l
        lo, hi = L & 0x0F, L >> 4
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        sc = p["sc"].reshape(n, 16).view(torch.uint8)
        return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc, _f16_bytes(p["d"])], dim=1)

    def unpack(self, b):
        n = b.shape[0]
        ql = b[:, :128].reshape(n, 2, 2, 32)  # [half, which 32, l]
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        lo = torch.stack(
            [ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2
        )
        hi = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).reshape(n, 256)
        sc = b[:, 192:208].contiguous().view(torch.int8)
        return q, self._params(_bytes_f16(b[:, 208:210]).half(), sc)


# IQ4_NL / IQ4_XS: 16 non-uniform levels (kvalues_iq4nl) and llama.cpp's weighted scale search
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_GRID = torch.tensor(IQ4NL_VALUES, dtype=torch.float32)
_IQ4_NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs (what ggml_quantize_chunk and llama-quantize run)


def _best_index(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``best_index_int8(16, kvalues_iq4nl, x)`` elementwise: the nearest level, the
    upper one on a tie, the differences taken in fp32 as the C code takes them."""
    v = _IQ4_GRID
    mu = torch.searchsorted(v, x.contiguous(), right=True).clamp_(1, 15)  # first level > x
    lo, hi = v[mu - 1], v[mu]
    idx = torch.where((x - lo) < (hi - x), mu - 1, mu)
    idx = torch.where(x <= v[0], 0, idx)
    return torch.where(x >= v[15], 15, idx)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor, super_block: int) -> torch.Tensor:
    """The search's weights with an importance matrix for blocks of 32 (rows of ``x``
    [n * super_block/32, 32]): ``qw * sqrtf(sigma2 + x**2)``, ``sigma2`` twice the mean square
    of the super-block (summed left to right in fp32). Without one the weights are ``x**2``."""
    sigma2 = _row_sumsq(x, super_block // 32) * (2.0 / super_block)  # a power of 2: exact
    return qw * _root(sigma2 + x * x)


def _iq4_search(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale of each block of 32 (rows of ``x``) as ``quantize_row_iq4_nl_impl`` searches
    it with ``ntry = 7``: from ``max/127``, then 15 grid stretches ``(itry - 127)/max``, keeping
    the weighted least-squares scale of the best fit. fp32 [S, 1]; 0 for an all-(near-)zero
    block. Runs on the transposes [32, S] so each C-order sum is 32 contiguous adds."""
    xt, wt = x.t().contiguous(), w.t().contiguous()
    _, zero, mxs = _signed_max(xt)
    grid = _IQ4_GRID

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = grid[_best_index(iscale * xt)]
        wq = wt * q
        return _seqsum0(wq * xt), _seqsum0(wq * q)

    d0 = mxs / torch.full_like(mxs, 127.0)  # -max / values[0], one fp32 division
    sumqx, sumq2 = sums(_div(1, d0))
    pos = sumq2 > 0
    d = torch.where(pos, sumqx / torch.where(pos, sumq2, 1.0), 0.0)
    best = d * sumqx
    for itry in range(-_IQ4_NTRY, _IQ4_NTRY + 1):
        sumqx, sumq2 = sums(_div(itry + IQ4NL_VALUES[0], mxs))
        pos = sumq2 > 0
        better = pos & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(pos, sumq2, 1.0), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d).reshape(-1, 1)


class _IQ4_NL(BlockType):
    """IQ4_NL: blocks of 32, x = d * kvalues_iq4nl[q] with fp16 d from a weighted scale search
    (weights ``x**2``, or the importance matrix's ``qw * sqrt(sigma2 + x**2)``)."""

    name, type_size, weighted = "iq4_nl", 18, True

    def search_weights(self, x, qw, per_row):
        return _iq4_weights(x, qw, 32)

    def fit(self, x, w=None):
        d = _iq4_search(x, x * x if w is None else w)
        return {"d": _f16(d), "id": _inv(d)}  # codes round with the fp32 scale

    def codes(self, x, p):
        return _best_index(x * p["id"]).to(torch.uint8)

    def decode(self, q, p):
        return p["d"].float() * _IQ4_GRID[q.long()]

    def pack(self, q, p):
        return torch.cat([_f16_bytes(p["d"]), _nibbles(q)], dim=1)

    def unpack(self, b):
        return _unnibbles(b[:, 2:]), {"d": _bytes_f16(b[:, :2]).half()}


class _IQ4_XS(BlockType):
    """IQ4_XS: 256 = 8 blocks of 32 on the IQ4_NL levels, each with a 6-bit scale
    ``ls - 32`` of one fp16 ``d``: x = d * (ls - 32) * kvalues_iq4nl[q]."""

    name, block, type_size, weighted = "iq4_xs", QK_K, 136, True

    def search_weights(self, x, qw, per_row):
        n = x.shape[0]
        return _iq4_weights(x.reshape(n * 8, 32), qw.reshape(n * 8, 32), QK_K).reshape(n, 256)

    def fit(self, x, w=None):
        n = x.shape[0]
        xs = x.reshape(n * 8, 32)
        ws = xs * xs if w is None else w.reshape(n * 8, 32)
        scales = _iq4_search(xs, ws).reshape(n, 8)
        # the first block scale of largest magnitude; +0 when none is non-zero (C: `>` from 0)
        imax = scales.abs().argmax(dim=1, keepdim=True)
        big = torch.gather(scales, 1, imax)
        max_scale = torch.where(big.abs() > 0, big, torch.zeros_like(big))
        d = -max_scale / 32  # -0.0 for an all-zero block, stored as fp16 -0 as C does
        ls = _nearest_int(_inv(d) * scales).clamp_(-32, 31)
        dl = (d * ls).unsqueeze(-1)  # [n, 8, 1]: the fp32 sub-block scale the codes round with
        return self._params(_f16(d), (ls + 32).to(torch.uint8), _inv(dl))

    @staticmethod
    def _params(d, ls, idl=None):
        p = {"d": d, "ls": ls, "dl": (d.float() * (ls.float() - 32)).unsqueeze(-1)}
        if idl is not None:
            p["idl"] = idl
        return p

    def codes(self, x, p):
        n = x.shape[0]
        return _best_index(x.reshape(n, 8, 32) * p["idl"]).to(torch.uint8).reshape(n, 256)

    def decode(self, q, p):
        n = q.shape[0]
        return (p["dl"] * _IQ4_GRID[q.long()].reshape(n, 8, 32)).reshape(n, 256)

    def pack(self, q, p):
        n = q.shape[0]
        ls = p["ls"].to(torch.int32)
        hi = ((ls >> 4) & 3) << (2 * torch.arange(8, dtype=torch.int32))
        h = hi.sum(dim=1, keepdim=True)  # uint16 scales_h, little-endian
        sh = torch.cat([h & 0xFF, h >> 8], dim=1)
        sl = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
        qs = _nibbles(q.reshape(n * 8, 32)).reshape(n, 128)
        return torch.cat([_f16_bytes(p["d"]), sh.to(torch.uint8), sl.to(torch.uint8), qs], dim=1)

    def unpack(self, b):
        n = b.shape[0]
        h = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
        sl = b[:, 4:8].to(torch.int32)
        lo = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(n, 8)
        hi = (h.unsqueeze(1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3
        ls = (lo | (hi << 4)).to(torch.uint8)
        q = _unnibbles(b[:, 8:].reshape(n * 8, 16)).reshape(n, 256)
        return q, self._params(_bytes_f16(b[:, :2]).half(), ls)


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        _Q8_0(),
        _Sym("q4_0", 4),
        _Asym("q4_1", 4),
        _Sym("q5_0", 5),
        _Asym("q5_1", 5),
        _Q2_K(),
        _Q3_K(),
        _Q4_K(),
        _Q5_K(),
        _Q6_K(),
        _MXFP4(),
        _TQ("tq1_0"),
        _TQ("tq2_0"),
        _IQ4_NL(),
        _IQ4_XS(),
    )
}


# --------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFConfig(FormatConfig):
    family = "gguf"
    qtype: str = "q8_0"

    @property
    def spec(self) -> str:
        return f"gguf-{self.qtype}"


@register(r"gguf", GGUFConfig, [f"gguf-{t}" for t in BLOCK_TYPES])
def _parse(m: re.Match[str], tokens: list[str]) -> GGUFConfig:
    if len(tokens) != 1 or tokens[0] not in BLOCK_TYPES:
        got = "-".join(tokens) or "nothing"
        raise ConfigError(
            f"unknown GGUF type '{got}' in 'gguf-{got}': use one of "
            + ", ".join(f"gguf-{t}" for t in BLOCK_TYPES)
        )
    return GGUFConfig(tokens[0])


def fallback_spec(spec: str, shape: tuple[int, ...]) -> str:
    """The GGUF format llama.cpp would use for a tensor of ``shape``: ``spec`` itself when the
    rows fit its blocks, else its per-tensor fallback (:data:`FALLBACK`)."""
    fmt = get_gguf(spec)
    k = shape[-1] if shape else 1
    if k % fmt.bt.block == 0:
        return fmt.spec
    nxt = FALLBACK.get(fmt.bt.name)
    if nxt is None or k % BLOCK_TYPES[nxt].block:
        raise ConfigError(
            f"{spec}: rows of {k} are not a multiple of {fmt.bt.block} and GGUF has no fallback "
            "for it: keep this tensor in F16/F32"
        )
    return f"gguf-{nxt}"


def get_gguf(spec: str) -> GGUFFormat:
    fmt = get(spec)
    if not isinstance(fmt, GGUFFormat):
        raise ConfigError(f"'{spec}' is not a GGUF block format: use one of {', '.join(PRESETS)}")
    return fmt


PRESETS = [f"gguf-{t}" for t in BLOCK_TYPES]


@register_format(GGUFConfig)
class GGUFFormat(Format):
    """A GGUF block type; ``quantize`` stores the GGUF tensor bytes as the part ``blocks``."""

    family = "gguf"

    def __init__(self, config: GGUFConfig, name: str | None = None):
        super().__init__(config, name)
        self.cfg = config
        self.bt = BLOCK_TYPES[config.qtype]

    @property
    def ggml_type(self) -> str:
        """The ``gguf.GGMLQuantizationType`` member name, e.g. ``Q4_K``."""
        return self.bt.name.upper()

    @property
    def description(self) -> str:
        b = self.bt
        return f"GGUF {self.ggml_type}: {b.type_size}-byte blocks of {b.block} (llama.cpp layout)"

    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        n = math.prod(shape)
        return {"blocks": -(-n // self.bt.block) * self.bt.type_size * 8}

    def for_shape(self, shape: tuple[int, ...]) -> Format:
        """llama.cpp's per-tensor fallback (:data:`FALLBACK`) for rows
        that are not a multiple of the block; the format itself otherwise."""
        return get(fallback_spec(self.spec, tuple(shape)))

    # -- helpers -------------------------------------------------------------------------------
    def check_shape(self, shape: tuple[int, ...]) -> None:
        k = shape[-1] if shape else 1
        if k % self.bt.block:
            hint = ""
            if self.bt.name in FALLBACK:
                hint = f"; llama.cpp uses gguf-{FALLBACK[self.bt.name]} for such tensors"
            raise ConfigError(
                f"{self.spec}: rows of {k} elements are not a multiple of its {self.bt.block}-"
                f"element blocks (shape {tuple(shape)}){hint}"
            )

    def blocks_of(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as fp32 [nblocks, block], refusing shapes and values GGUF cannot hold."""
        check_input(t, self.spec)
        self.check_shape(tuple(t.shape))
        x = t.detach().float().reshape(-1, self.bt.block).cpu()
        if not torch.isfinite(x).all():
            raise ConfigError(f"{self.spec}: the tensor holds NaN or Inf, which GGUF blocks cannot")
        return x

    def _finish(self, t: torch.Tensor, raw: torch.Tensor, **meta: Any) -> QuantizedTensor:
        rows = math.prod(t.shape[:-1]) if t.dim() > 1 else 1
        return self._qt(t, {"blocks": raw.reshape(rows, -1).contiguous()}, **meta)

    # -- conversion ----------------------------------------------------------------------------
    @property
    def takes_imatrix(self) -> bool:
        """Whether ``imatrix=`` moves this type's scales (Q4_0, Q5_0, the K types Q2_K-Q6_K,
        IQ4_NL, IQ4_XS), as it moves llama.cpp's ``ggml_quantize_chunk``."""
        return self.bt.weighted

    def block_weights(self, t: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor | None:
        """The importance matrix (one non-negative fp32 value per column of ``t``, llama.cpp's
        mean squared activation) as one weight per element, in ``blocks_of(t)``'s layout."""
        if imatrix is None:
            return None
        if not self.bt.weighted:
            raise ConfigError(
                f"{self.spec}: joules' {self.ggml_type} has no importance-matrix search: drop "
                "imatrix=, or use gguf-q4_0 / q5_0 / q2_k..q6_k / iq4_nl / iq4_xs"
            )
        k = t.shape[-1] if t.dim() else 1
        qw = imatrix.detach().float().cpu().reshape(-1)
        if qw.numel() != k:
            raise ConfigError(
                f"{self.spec}: the importance matrix has {qw.numel()} values for rows of {k} "
                "elements: give one per input column"
            )
        if not (torch.isfinite(qw).all() and (qw >= 0).all()):
            raise ConfigError(f"{self.spec}: the importance matrix must be finite and >= 0")
        rows = t.numel() // k
        return qw.expand(rows, k).reshape(-1, self.bt.block)

    def _row_chunks(
        self, t: torch.Tensor, x: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows of ``t``, their blocks in ``x``) a few whole rows at a time, at most
        :data:`_FIT_CHUNK_ELEMS` elements: blocks never span rows, so fitting and rounding chunk
        by chunk gives the bytes of one pass, while the search's temporaries (a dozen tensors
        the size of what is fitted, the importance matrix expanded to every element) stay small
        instead of the weight's size (an 8B model's down_proj is 59M, a 128k-vocabulary
        embedding 262M)."""
        k = t.shape[-1] if t.dim() else 1
        rows = t.numel() // k
        per_row = k // self.bt.block
        step = max(1, _FIT_CHUNK_ELEMS // k)
        t2 = t.reshape(rows, k)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield t2[r0:r1], x[r0 * per_row : r1 * per_row]

    def _fit_rows(self, t: torch.Tensor, x: torch.Tensor, imatrix: torch.Tensor | None):
        """The parameters of the blocks ``x`` of rows ``t``, in one pass."""
        qw = self.block_weights(t, imatrix)
        if qw is None:
            return self.bt.fit(x)
        per_row = (t.shape[-1] if t.dim() else 1) // self.bt.block
        return self.bt.fit(x, self.bt.search_weights(x, qw, per_row))

    def _fit(self, t: torch.Tensor, x: torch.Tensor, imatrix: torch.Tensor | None):
        """Every block's parameters, fitted :meth:`_row_chunks` at a time."""
        parts = [self._fit_rows(tc, xc, imatrix) for tc, xc in self._row_chunks(t, x)]
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([pt[key] for pt in parts]) for key in parts[0]}

    def quantize(self, t: torch.Tensor, imatrix: torch.Tensor | None = None) -> QuantizedTensor:
        """GGUF blocks of ``t``; ``imatrix`` (one value per column) for the types whose search
        takes it, as ``llama-quantize --imatrix`` passes it. Fitted, rounded and packed
        :meth:`_row_chunks` at a time (the bytes of one pass)."""
        x = self.blocks_of(t)
        raw = []
        for tc, xc in self._row_chunks(t, x):
            p = self._fit_rows(tc, xc, imatrix)
            raw.append(self.bt.pack(self.bt.codes(xc, p), p))
        return self._finish(t, raw[0] if len(raw) == 1 else torch.cat(raw))

    def unpack(self, q: QuantizedTensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Codes [nblocks, block] and stored parameters of ``q``."""
        check_qt(q, self.spec)
        raw = q.parts["blocks"].cpu().reshape(-1, self.bt.type_size)
        return self.bt.unpack(raw)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes, p = self.unpack(q)
        dev = q.parts["blocks"].device
        return self.bt.decode(codes, p).reshape(q.shape).to(device=dev, dtype=q.dtype)

    def fake_quant(self, t: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        x = self.blocks_of(t)
        p = self._fit(t, x, imatrix)
        out = self.bt.decode(self.bt.codes(x, p), p)
        return out.reshape(t.shape).to(device=t.device, dtype=t.dtype)

    def fit(self, w: torch.Tensor, imatrix: torch.Tensor | None = None) -> GGUFFitted:
        """Fix every block's parameters (scales, minima, K-quant sub-block scales) from ``w``;
        ``imatrix`` (one value per column) weights the scale search where the type takes it."""
        check_fit_input(w, self.spec)
        return GGUFFitted(self, w, imatrix)


class GGUFFitted(Fitted):
    """A GGUF block type with the block parameters of one weight [rows, cols] fixed.

    Codes are rounded as the reference quantizer rounds them once its parameters are known
    (legacy types with the fp32 scale, K-quants with the stored fp16 sub-block scales), so
    ``fit(w).quantize(w)`` is ``quantize(w)`` byte for byte and GPTQ's rounded columns are the
    values llama.cpp decodes.
    """

    def __init__(self, fmt: GGUFFormat, w: torch.Tensor, imatrix: torch.Tensor | None = None):
        super().__init__(fmt, (int(w.shape[0]), int(w.shape[1])))
        self.fmt = fmt
        self.bt = fmt.bt
        x = fmt.blocks_of(w)
        self.per_row = self.shape[1] // self.bt.block
        # parameters of block j of row r at index r * per_row + j
        self.p = fmt._fit(w, x, imatrix)
        self.imatrix_weighted = imatrix is not None  # the manifest says so (gptq)

    def _select(self, b0: int, b1: int) -> dict[str, torch.Tensor]:
        rows = self.shape[0]
        return {
            k: v.reshape(rows, self.per_row, *v.shape[1:])[:, b0:b1].reshape(-1, *v.shape[1:])
            for k, v in self.p.items()
        }

    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        self._check_cols(cols, col0)
        rows, n = cols.shape
        bs = self.bt.block
        b0, b1 = col0 // bs, -(-(col0 + n) // bs)
        off = col0 - b0 * bs
        x = cols.detach().float().cpu()
        if off or n != (b1 - b0) * bs:
            buf = torch.zeros(rows, (b1 - b0) * bs)
            buf[:, off : off + n] = x
            x = buf
        p = self._select(b0, b1) if (b0, b1) != (0, self.per_row) else self.p
        xb = x.reshape(-1, bs)
        out = self.bt.decode(self.bt.codes(xb, p), p).reshape(rows, -1)[:, off : off + n]
        return out.to(cols.device)

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        self._check_weight(w)
        x = self.fmt.blocks_of(w)
        return self.fmt._finish(w, self.bt.pack(self.bt.codes(x, self.p), self.p))


def gguf_blocks(q: QuantizedTensor) -> tuple[str, torch.Tensor]:
    """(GGML type name, uint8 [rows, row_bytes]) of a tensor in a ``gguf-*`` format."""
    fmt = get_gguf(q.spec)
    return fmt.ggml_type, q.parts["blocks"].cpu().contiguous()


def mxfp4_to_gguf_blocks(q: QuantizedTensor) -> torch.Tensor:
    """Repack a joules ``mxfp4`` (OCP MX) tensor as GGUF MXFP4 bytes [rows, row_bytes], lossless:
    same E8M0 byte and E2M1 codes, only the nibble order changes (a -0 code decodes as +0)."""
    if q.spec != "mxfp4":
        raise ConfigError(f"'{q.spec}' is not OCP mxfp4 (blocks of 32): only 'mxfp4' repacks")
    k = q.shape[-1] if q.shape else 1
    if k % 32:
        raise ConfigError(f"mxfp4: rows of {k} are not a multiple of 32, as GGUF MXFP4 needs")
    e = q.parts["scales"].cpu().reshape(-1, 1)
    if (e == 255).any():
        raise ConfigError("mxfp4: a block holds NaN (E8M0 0xFF), which GGUF MXFP4 cannot")
    codes = unpack(q.parts["codes"].cpu(), get("mxfp4").elem_bits, q.numel).reshape(-1, 32)
    rows = math.prod(q.shape[:-1]) if len(q.shape) > 1 else 1
    return torch.cat([e, _nibbles(codes)], dim=1).reshape(rows, -1).contiguous()
