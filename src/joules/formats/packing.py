"""Bit packing: b-bit unsigned codes (1 <= b <= 8) to and from a flat uint8 byte string.

    >>> import torch
    >>> from joules.formats.packing import pack, unpack
    >>> codes = torch.tensor([1, 2, 3, 0, 5], dtype=torch.uint8)
    >>> packed = pack(codes, 3)                 # 5 codes x 3 bits = 15 bits -> 2 bytes
    >>> packed.numel()
    2
    >>> unpack(packed, 3, 5).tolist()
    [1, 2, 3, 0, 5]

Layout: little-endian bit stream; code i occupies bits [b*i, b*i + b) of the stream, so for 4-bit
codes the first code of a pair is the low nibble (as torchao's ``pack_uint4`` and GGUF do). Codes
are packed in groups of ``g = 8 / gcd(8, b)`` codes (``g*b/8`` whole bytes); the trailing bytes
that would hold only padding are dropped, so ``pack`` always returns exactly
``ceil(numel * b / 8)`` bytes -- the storage cost equals the bit cost rounded up to a byte.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes ``pack`` returns for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _group(bits: int) -> tuple[int, int]:
    g = 8 // math.gcd(8, bits)  # codes per group
    return g, g * bits // 8  # (codes, bytes) per group


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any shape, values < 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    g, nb = _group(bits)
    pad = (-n) % g
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if nb == 1:  # 1, 2 or 4 bits: g codes share one byte
        grp = flat.view(-1, g)
        out = grp[:, 0].clone()
        for i in range(1, g):
            out |= grp[:, i] << (bits * i)
    else:  # 3, 5, 6, 7 bits: g codes make an nb-byte little-endian integer
        wide = torch.int32 if nb <= 3 else torch.int64
        grp = flat.view(-1, g).to(wide)
        acc = grp[:, 0].clone()
        for i in range(1, g):
            acc |= grp[:, i] << (bits * i)
        out = torch.stack([((acc >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(nb)], dim=1)
    return out.reshape(-1)[: packed_nbytes(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:numel].clone()
    g, nb = _group(bits)
    ngroups = -(-numel // g)
    pad = ngroups * nb - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    mask = (1 << bits) - 1
    if nb == 1:
        grp = flat.view(-1, 1)
        shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.uint8)
        out = (grp >> shifts) & mask
    else:
        wide = torch.int32 if nb <= 3 else torch.int64
        grp = flat.view(-1, nb).to(wide)
        acc = grp[:, 0].clone()
        for j in range(1, nb):
            acc |= grp[:, j] << (8 * j)
        shifts = torch.arange(0, g * bits, bits, device=flat.device, dtype=wide)
        out = ((acc[:, None] >> shifts) & mask).to(torch.uint8)
    return out.reshape(-1)[:numel].contiguous()


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack base-3 digits (values 0, 1, 2) five to a byte (3**5 = 243 <= 256): 1.6 bits each."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    grp = flat.view(-1, 5)
    out = grp[:, 0].clone()
    for i in range(1, 5):
        out = out * 3 + grp[:, i]
    return out


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``numel`` base-3 digits as uint8."""
    p = packed.reshape(-1).to(torch.int16)
    pw = torch.tensor([81, 27, 9, 3, 1], device=p.device, dtype=torch.int16)
    digits = (p[:, None] // pw) % 3
    return digits.to(torch.uint8).reshape(-1)[:numel].contiguous()


def trit_nbytes(numel: int) -> int:
    """Bytes :func:`pack_trits` returns for ``numel`` digits."""
    return -(-numel // 5)
