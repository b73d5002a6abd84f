"""Compression: recipes of registered steps applied to Hugging Face models, saved and reloaded.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, info = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "gptq(format=int4-g32)", calibration=calib)
    >>> cm.manifest.bits_per_weight
    4.5

Steps (``joules compress --help`` lists them): ``rtn``, ``gptq``; later modules add more by
registering a ``@dataclass`` step config (see :mod:`joules.compress.recipe`).
"""

from joules.compress import (  # noqa: F401  (registers the built-in steps and kernels)
    actquant,
    awq,
    gptq,
    heads,
    kernels,
    kvcache,
    mixed,
    outliers,
    prune,
    rtn,
    smoothquant,
)
from joules.compress.api import (
    CompressedModel,
    compress,
    is_compressed_dir,
    load_compressed,
    read_manifest,
    register_runtime_hook,
    save_compressed,
)
from joules.compress.context import CompressContext, calibration_tokens
from joules.compress.kernels import Kernel
from joules.compress.kernels import register as register_kernel
from joules.compress.linear import (
    CompressedLinear,
    compressed_linears,
    layer_paths,
    linear_paths,
    prepack,
    register_module,
    set_kernels,
)
from joules.compress.manifest import Manifest
from joules.compress.recipe import Recipe, Step, parse_recipe, register_step, step_names

__all__ = [
    "CompressContext",
    "CompressedLinear",
    "CompressedModel",
    "Kernel",
    "Manifest",
    "Recipe",
    "Step",
    "calibration_tokens",
    "compress",
    "compressed_linears",
    "is_compressed_dir",
    "layer_paths",
    "linear_paths",
    "load_compressed",
    "parse_recipe",
    "prepack",
    "read_manifest",
    "register_kernel",
    "register_module",
    "register_runtime_hook",
    "register_step",
    "save_compressed",
    "set_kernels",
    "step_names",
]
