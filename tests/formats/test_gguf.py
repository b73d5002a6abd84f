"""GGUF block formats against the `gguf` package: bytes identical to its quantizers (legacy, TQ,
MXFP4), values identical to its dequantizers (every type), on random and adversarial tensors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from joules import formats
from joules.errors import ConfigError
from joules.formats.gguf import BLOCK_TYPES, fallback_spec, mxfp4_to_gguf_blocks

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

ALL = list(BLOCK_TYPES)
WITH_GGUF_QUANTIZER = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4", "tq1_0", "tq2_0"]
BPE = {
    "q8_0": 8.5,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "q5_0": 5.5,
    "q5_1": 6.0,
    "q2_k": 2.625,
    "q3_k": 3.4375,
    "q4_k": 4.5,
    "q5_k": 5.5,
    "q6_k": 6.5625,
    "mxfp4": 4.25,
    "tq1_0": 1.6875,
    "tq2_0": 2.0625,
    "iq4_nl": 4.5,
    "iq4_xs": 4.25,
}
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def qtype(t: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[t.upper()]


def adversarial(block: int) -> dict[str, np.ndarray]:
    """Rows of 2 blocks each (512 for the 256-blocks: one super-block pair)."""
    rng = np.random.default_rng(1)
    n = 2 * block
    x = rng.standard_normal((4, n)).astype(np.float32)
    zero = np.zeros((3, n), np.float32)
    outlier = (rng.standard_normal((3, n)) * 1e-3).astype(np.float32)
    outlier[:, 5] = 40.0
    outlier[1, block + 7] = -40.0
    # ties: values on exact half-steps of the grid, and +-max of equal magnitude
    ties = np.tile(np.linspace(-8, 8, 33, dtype=np.float32)[:32], (2, n // 32))
    ties[1, ::2] *= -1
    pm = x.copy()
    pm[:, 3], pm[:, 4] = 5.0, -5.0
    pm2 = x.copy()
    pm2[:, 3], pm2[:, 4] = -5.0, 5.0
    # subnormal fp16 scales (block maxima around 1e-6) and tiny but normal fp32 values
    sub = (rng.standard_normal((3, n)) * 1e-6).astype(np.float32)
    tiny = (rng.standard_normal((2, n)) * 1e-30).astype(np.float32)
    const = np.full((2, n), 0.3, np.float32)
    const[1] = -2.5
    half = (rng.integers(-16, 17, (3, n)) / 2).astype(np.float32)
    return {
        "random": x,
        "zero": zero,
        "outlier": outlier,
        "ties": ties,
        "pm": pm,
        "mp": pm2,
        "subnormal_scale": sub,
        "tiny": tiny,
        "constant": const,
        "halves": half,
    }


@pytest.mark.parametrize("t", ALL)
def test_bits_per_element_are_ggufs(t):
    fmt = formats.get(f"gguf-{t}")
    assert fmt.bits_per_element((4096, 4096)) == BPE[t]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype(t)]
    assert (fmt.bt.block, fmt.bt.type_size) == (block, type_size)
    q = fmt.quantize(torch.randn(3, 2 * block))
    assert q.nbytes == 3 * 2 * type_size == fmt.storage_nbytes((3, 2 * block))


@pytest.mark.parametrize("t", WITH_GGUF_QUANTIZER)
@pytest.mark.parametrize("case", list(adversarial(32)))
def test_bytes_equal_gguf_quantizer_adversarial(t, case):
    fmt = formats.get(f"gguf-{t}")
    x = adversarial(fmt.bt.block)[case]
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    assert np.array_equal(ours, quants.quantize(x, qtype(t)))


@pytest.mark.parametrize("t", WITH_GGUF_QUANTIZER)
@SETTINGS
@given(data=st.data())
def test_bytes_equal_gguf_quantizer_random(t, data):
    fmt = formats.get(f"gguf-{t}")
    rows = data.draw(st.integers(1, 3))
    nblk = data.draw(st.integers(1, 3))
    scale = data.draw(st.sampled_from([1e-5, 1.0, 300.0]))
    x = data.draw(
        arrays(np.float32, (rows, nblk * fmt.bt.block), elements=st.floats(-8, 8, width=32))
    )
    x = (x * np.float32(scale)).astype(np.float32)
    # numpy's min/max/argmax may return -0 where llama.cpp's C loops keep +0 or the first of
    # equal values (the sign bit of a zero d or m), as joules does: signed zeros are checked
    # against llama.cpp itself in tests/deploy/test_llamacpp.py
    x = x + np.float32(0.0)
    # A block whose amax is below 2^-120 takes undefined paths in llama.cpp's C code, which
    # gguf's numpy port mirrors: the scale's reciprocal 1/d overflows to inf for an
    # fp32-subnormal d (legacy and TQ types), and MXFP4's E8M0 exponent leaves its range under
    # 2^-125. joules encodes such blocks as zeros (fixed cases with subnormal scales are in the
    # adversarial tests above); only defined inputs are compared here.
    amax = np.abs(x.reshape(-1, fmt.bt.block)).max(axis=1)
    assume(not np.any((amax > 0) & (amax < np.float32(2.0**-120))))
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    assert np.array_equal(ours, quants.quantize(x, qtype(t)))


@pytest.mark.parametrize("t", ALL)
@pytest.mark.parametrize("case", list(adversarial(32)))
def test_values_equal_gguf_dequantizer(t, case):
    fmt = formats.get(f"gguf-{t}")
    x = torch.from_numpy(adversarial(fmt.bt.block)[case])
    q = fmt.quantize(x)
    ref = quants.dequantize(q.parts["blocks"].numpy(), qtype(t))
    ours = fmt.dequantize(q)
    assert np.array_equal(ref.view(np.int32), ours.numpy().view(np.int32))
    assert torch.equal(fmt.fake_quant(x), ours)


@pytest.mark.parametrize("t", ALL)
@SETTINGS
@given(data=st.data())
def test_unpack_pack_round_trip(t, data):
    # any byte string of whole blocks unpacks to codes and parameters that pack back to it
    # (Q4_K's 6-bit scales and TQ1_0's base-3 bytes only span part of a byte: draw valid ones)
    fmt = formats.get(f"gguf-{t}")
    x = torch.from_numpy(
        data.draw(arrays(np.float32, (2, fmt.bt.block), elements=st.floats(-4, 4, width=32)))
    )
    raw = fmt.quantize(x).parts["blocks"].reshape(-1, fmt.bt.type_size)
    codes, p = fmt.bt.unpack(raw)
    assert torch.equal(fmt.bt.pack(codes, p), raw)


@pytest.mark.parametrize("t", ALL)
def test_leading_dims_and_dtype_kept(t):
    fmt = formats.get(f"gguf-{t}")
    x = torch.randn(2, 3, fmt.bt.block, dtype=torch.bfloat16)
    q = fmt.quantize(x)
    assert q.parts["blocks"].shape == (6, fmt.bt.type_size)
    y = fmt.dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_rows_not_multiple_of_block_name_llamacpp_fallback():
    with pytest.raises(ConfigError, match="gguf-q5_0"):
        formats.get("gguf-q4_k").quantize(torch.randn(4, 576))
    with pytest.raises(ConfigError, match="multiple of its 32"):
        formats.get("gguf-q4_0").quantize(torch.randn(4, 40))
    assert fallback_spec("gguf-q4_k", (1536, 576)) == "gguf-q5_0"
    assert fallback_spec("gguf-q6_k", (576, 1536)) == "gguf-q6_k"
    assert fallback_spec("gguf-q6_k", (576, 576)) == "gguf-q8_0"
    assert fallback_spec("gguf-tq2_0", (576, 576)) == "gguf-q4_0"
    with pytest.raises(ConfigError, match="no fallback"):
        fallback_spec("gguf-q4_0", (4, 40))


def test_non_finite_refused_and_bad_spec():
    with pytest.raises(ConfigError, match="NaN or Inf"):
        formats.get("gguf-q8_0").quantize(torch.tensor([[float("nan")] + [0.0] * 31]))
    with pytest.raises(ConfigError, match="gguf-q4_k"):
        formats.get("gguf-q7_k")


@SETTINGS
@given(
    x=arrays(np.float32, (2, 64), elements=st.floats(-100, 100, width=32)),
)
def test_ocp_mxfp4_repacks_losslessly_into_gguf_mxfp4(x):
    # every value of joules' OCP mxfp4 is a GGUF MXFP4 value with the same exponent byte
    t = torch.from_numpy(x)
    q = formats.get("mxfp4").quantize(t)
    blocks = mxfp4_to_gguf_blocks(q)
    ref = quants.dequantize(blocks.numpy(), GGMLQuantizationType.MXFP4)
    assert np.array_equal(ref, formats.get("mxfp4").dequantize(q).numpy())  # -0 reads as +0


def test_mxfp4_rounding_differs_from_ocp_only_on_ties_and_signed_zero():
    x = torch.tensor([[1.75, 0.75, 3.5, 2.5, -0.1, 6.0] + [0.0] * 26])  # amax 6: X = 1
    ocp = formats.get("mxfp4").fake_quant(x)[0, :6].tolist()
    gg = formats.get("gguf-mxfp4").fake_quant(x)[0, :6].tolist()
    assert ocp == [2.0, 1.0, 4.0, 2.0, -0.0, 6.0]
    assert gg == [1.5, 0.5, 3.0, 2.0, 0.0, 6.0]


# -- fixed-parameter quantization (Format.fit, for GPTQ) -------------------------------------


@pytest.mark.parametrize("t", ALL)
def test_fit_reproduces_quantize_and_columns_agree(t):
    fmt = formats.get(f"gguf-{t}")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 2 * fmt.bt.block, generator=g)
    w[0, :32] = 0  # an all-zero run (a zero sub-block scale in the K-quants)
    f = fmt.fit(w)
    q = f.quantize(w)
    assert torch.equal(q.parts["blocks"], fmt.quantize(w).parts["blocks"])
    whole = f.fake_quant_cols(w, 0)
    assert torch.equal(whole, fmt.fake_quant(w)) and torch.equal(whole, fmt.dequantize(q))
    k = w.shape[1]
    cuts = [0, 1, 5, 31, 33, k // 2 + 3, k]
    parts = [f.fake_quant_cols(w[:, a:b], a) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    one = torch.cat([f.fake_quant_cols(w[:, c : c + 1], c) for c in range(0, k, 7)], dim=1)
    assert torch.equal(one, whole[:, ::7])


@pytest.mark.parametrize("t", ALL)
def test_fit_keeps_parameters_on_a_perturbed_weight(t):
    fmt = formats.get(f"gguf-{t}")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, fmt.bt.block, generator=g)
    w2 = w + 0.3 * torch.randn(w.shape, generator=g)
    w2[0, 0] = 50.0  # far outside the block's range: clips
    f = fmt.fit(w)
    q2 = f.quantize(w2)
    _, p = fmt.unpack(q2)
    _, p_ref = fmt.unpack(fmt.quantize(w))
    stored = {"d", "m", "dmin", "sc", "e", "ls"}
    for name in stored & p.keys():
        assert torch.equal(p[name], p_ref[name]), name
    assert torch.equal(fmt.dequantize(q2), f.fake_quant_cols(w2, 0))
    # the clipped element decodes to a value of the block's grid, no larger than its extreme
    assert fmt.dequantize(q2)[0, 0] <= fmt.dequantize(fmt.quantize(w)).abs().max() * 1.0001 + 1e-6


WEIGHTED = [t for t, bt in BLOCK_TYPES.items() if bt.weighted]


def test_weighted_types_are_the_iq4s():
    assert WEIGHTED == ["q4_0", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]


@pytest.mark.parametrize("t", WEIGHTED)
def test_fit_with_imatrix_reproduces_quantize_with_imatrix(t):
    fmt = formats.get(f"gguf-{t}")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 2 * fmt.bt.block, generator=g)
    im = torch.rand(w.shape[1], generator=g) ** 4  # skewed, as activations are
    im[::9] = 0  # dead input columns
    q = fmt.quantize(w, imatrix=im)
    assert not torch.equal(q.parts["blocks"], fmt.quantize(w).parts["blocks"])
    f = fmt.fit(w, imatrix=im)
    assert torch.equal(f.quantize(w).parts["blocks"], q.parts["blocks"])
    assert torch.equal(f.fake_quant_cols(w, 0), fmt.fake_quant(w, imatrix=im))
    assert torch.equal(fmt.fake_quant(w, imatrix=im), fmt.dequantize(q))


@pytest.mark.parametrize("t", WEIGHTED)
def test_imatrix_weighting_lowers_the_weighted_error(t):
    """The weighted search trades error on unimportant columns for error on important ones."""
    fmt = formats.get(f"gguf-{t}")
    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, 512, generator=g)
    im = torch.rand(512, generator=g) ** 8 * 100
    err_w = ((fmt.fake_quant(w, imatrix=im) - w) ** 2 * im).sum()
    err_plain = ((fmt.fake_quant(w) - w) ** 2 * im).sum()
    assert err_w < 0.97 * err_plain


def test_imatrix_refused_where_the_type_has_no_weighted_search():
    w = torch.randn(2, 64)
    with pytest.raises(ConfigError, match=r"gguf-q8_0.*iq4_nl"):
        formats.get("gguf-q8_0").quantize(w, imatrix=torch.ones(64))
    with pytest.raises(ConfigError, match="32 values for rows of 64"):
        formats.get("gguf-iq4_nl").quantize(w, imatrix=torch.ones(32))
    with pytest.raises(ConfigError, match="finite and >= 0"):
        formats.get("gguf-iq4_nl").fit(w, imatrix=-torch.ones(64))
    assert fallback_spec("gguf-iq4_xs", (576, 576)) == "gguf-iq4_nl"


def test_fit_needs_2d_weight_of_whole_blocks():
    with pytest.raises(ConfigError, match="2-D"):
        formats.get("gguf-q4_0").fit(torch.randn(64))
    with pytest.raises(ConfigError, match="gguf-q8_0"):
        formats.get("gguf-q6_k").fit(torch.randn(4, 64))


@pytest.mark.parametrize("t", ALL)
@pytest.mark.parametrize("weighted", [False, True])
def test_fitting_a_few_rows_at_a_time_gives_the_one_pass_bytes(t, weighted, monkeypatch):
    """``_fit`` goes through large weights in chunks of whole rows (bounded temporaries); the
    bytes are those of fitting every row at once, for chunks of 1, 2 and 3 rows."""
    import joules.formats.gguf as g

    fmt = formats.get(f"gguf-{t}")
    if weighted and not fmt.takes_imatrix:
        pytest.skip("no importance-matrix search")
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(7, 2 * fmt.bt.block, generator=gen)
    w[3, 5] = 30.0  # one row unlike the others
    im = torch.rand(w.shape[1], generator=gen) ** 4 if weighted else None
    whole = fmt.quantize(w, imatrix=im).parts["blocks"]
    for rows in (1, 2, 3):
        monkeypatch.setattr(g, "_FIT_CHUNK_ELEMS", rows * w.shape[1])
        assert torch.equal(fmt.quantize(w, imatrix=im).parts["blocks"], whole), rows
