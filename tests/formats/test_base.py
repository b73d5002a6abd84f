"""Spec parsing, the registry, config round trips and exact bit accounting for every preset."""

from __future__ import annotations

import json

import pytest
import torch

from joules import formats
from joules.errors import ConfigError
from joules.formats.base import FormatConfig

VARIANTS = [
    "int4",
    "int6-g64-s32",
    "uint3-asym-ch",
    "uint4-asym-g32-zpint",
    "fp8-e4m3-ch",
    "fp6-e3m2-g16-sbf16",
    "fp4-e2m1-raw",
    "fp8-e5m2-raw",
    "mxfp8-e4m3-g16",
    "nf4-g128-s16",
    "nxfp4-nm3-cr",
    "nxfp6-e2m3",
    "nxfp8-e4m3-am",
    "ternary-ch",
    "codebook3-it5",
]
ALL = [f.name for f in formats.list()] + VARIANTS
# GGUF block types take only rows of whole blocks (their shapes: tests/formats/test_gguf.py)
ANY_SHAPE = [s for s in ALL if not s.startswith("gguf-")]


def test_list_has_every_family_and_required_name():
    names = {f.name for f in formats.list()}
    required = {
        "fp8-e4m3",
        "fp8-e5m2",
        "fp6-e2m3",
        "fp6-e3m2",
        "fp4-e2m1",
        "nf4",
        "mxfp8-e4m3",
        "mxfp8-e5m2",
        "mxfp6-e2m3",
        "mxfp6-e3m2",
        "mxfp4",
        "mxint8",
        "nxfp4",
        "nxfp4-nm",
        "nxfp4-am",
        "nxfp4-cr",
        "ternary",
        "codebook2",
        "codebook3",
        "codebook4",
        "uint4-asym-g32",
    }
    assert required <= names
    assert {f.family for f in formats.list()} == {
        "int",
        "minifloat",
        "nf4",
        "mx",
        "nxfp",
        "ternary",
        "codebook",
        "gguf",
    }


@pytest.mark.parametrize("spec", ALL)
def test_spec_and_config_round_trip(spec):
    fmt = formats.get(spec)
    assert formats.get(fmt.spec).config == fmt.config  # canonical spec parses to the same config
    d = fmt.config.to_dict()
    back = FormatConfig.from_dict(json.loads(json.dumps(d)))
    assert back == fmt.config


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "int9",
        "int4-g0",
        "int4-asym",
        "fp8",
        "fp8-e2m1",
        "mxfp5",
        "mxint4",
        "nxfp5",
        "codebook5",
        "int4-foo",
        "fp4-raw-g32",
        "nf4-ch",
        "wat",
        "nxfp4-nm9",
    ],
)
def test_bad_specs_raise_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        formats.get(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) > 10


@pytest.mark.parametrize("spec", ANY_SHAPE)
@pytest.mark.parametrize("shape", [(7, 45), (3, 2, 33), (100,), ()])
def test_storage_matches_bit_cost_and_roundtrip(spec, shape):
    fmt = formats.get(spec)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = fmt.quantize(x)
    bits = fmt.part_bits(shape)
    assert set(q.parts) == set(bits)
    for name, b in bits.items():  # each part stores exactly its bits, rounded up to a byte
        p = q.parts[name]
        assert p.numel() * p.element_size() == (b + 7) // 8, name
    assert q.nbytes == fmt.storage_nbytes(shape)
    assert fmt.bits_per_element(shape) * max(x.numel(), 1) == pytest.approx(fmt.total_bits(shape))
    y = fmt.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y.view(torch.int32), fmt.fake_quant(x).view(torch.int32))
    assert torch.equal(q.dequantize(), y)


def test_bits_per_element_examples():
    shape = (4096, 4096)
    assert formats.get("mxfp4").bits_per_element(shape) == 4.25
    assert formats.get("mxfp8-e4m3").bits_per_element(shape) == 8.25
    assert formats.get("mxint8").bits_per_element(shape) == 8.25
    assert formats.get("nf4").bits_per_element(shape) == 4.5
    assert formats.get("uint4-asym-g32").bits_per_element(shape) == 5.0  # GGUF Q4_1
    assert formats.get("int4-g128").bits_per_element(shape) == 4.125
    assert formats.get("int8").bits_per_element(shape) == 8 + 32 / 4096**2
    assert formats.get("codebook4").bits_per_element(shape) == 4 + 16 * 16 / 4096
    assert formats.get("nxfp4").bits_per_element(shape) == 4 + 12 / 32
    # a short last group still costs a whole scale
    assert formats.get("int4-g32").total_bits((2, 33)) == 2 * 33 * 4 + 4 * 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x = torch.randn(8, 64).to(dtype)
    for spec in ["int4-g32", "mxfp4", "nf4", "fp8-e4m3"]:
        fmt = formats.get(spec)
        y = fmt.fake_quant(x)
        assert y.dtype == dtype
        assert torch.equal(y, fmt.dequantize(fmt.quantize(x)))


def test_non_float_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="floating-point"):
        formats.get("int8").fake_quant(torch.arange(4))


def test_wrong_format_dequantize_is_a_clear_error():
    q = formats.get("int8").quantize(torch.randn(4))
    with pytest.raises(ConfigError, match="quantized as 'int8'"):
        formats.get("mxfp4").dequantize(q)


def test_quantized_tensor_moves_between_devices():
    q = formats.get("mxfp4").quantize(torch.randn(4, 32))
    q2 = q.to("cpu")
    assert q2.nbytes == q.nbytes and q2.device.type == "cpu"
