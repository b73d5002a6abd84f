"""Bit packing: exact byte counts and lossless round trips for every width."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from joules.formats.packing import (
    pack,
    pack_trits,
    packed_nbytes,
    trit_nbytes,
    unpack,
    unpack_trits,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_roundtrip_and_size(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, n), codes)


def test_nibble_order_matches_torchao_and_gguf():
    # first code of a pair in the low nibble
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 3-bit codes form a little-endian bit stream: 0b101 then 0b011 -> 0b011101
    assert pack(torch.tensor([5, 3], dtype=torch.uint8), 3).tolist() == [0b011101]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_trits_roundtrip(n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (n,), generator=g).to(torch.uint8)
    packed = pack_trits(codes)
    assert packed.numel() == trit_nbytes(n)
    assert torch.equal(unpack_trits(packed, n), codes)
