"""Number formats: exact bit costs, packed quantize/dequantize and fake_quant, one registry.

    >>> import torch
    >>> from joules import formats
    >>> [f.name for f in formats.list()][:3]
    ['int8', 'int8-ch', 'int4-ch']
    >>> fmt = formats.get("mxfp4")
    >>> x = torch.randn(128, 256)
    >>> q = fmt.quantize(x)                      # packed codes + E8M0 scales
    >>> torch.equal(fmt.dequantize(q), fmt.fake_quant(x))
    True

Families: integer (int/uint-asym), minifloat (OCP FP8/FP6/FP4), nf4, mx (OCP MX), nxfp
(Nanoscaling FP), ternary (BitNet b1.58), codebook (per-channel k-means), gguf (llama.cpp's
block types, bit for bit). Error analysis lives in
:mod:`joules.formats.error` (``compare_formats``).
"""

from joules.formats import codebook, gguf, integer, minifloat, mx, nf4, nxfp, ternary  # noqa: F401
from joules.formats.base import (
    PRESETS,
    BlockModel,
    Fitted,
    Format,
    FormatConfig,
    Grouping,
    QuantizedTensor,
    get,
    list_formats,
    parse_spec,
)
from joules.formats.error import FormatError, compare_formats, format_error

list = list_formats

__all__ = [
    "PRESETS",
    "BlockModel",
    "Fitted",
    "Format",
    "FormatConfig",
    "FormatError",
    "Grouping",
    "QuantizedTensor",
    "compare_formats",
    "format_error",
    "get",
    "list",
    "list_formats",
    "parse_spec",
]
