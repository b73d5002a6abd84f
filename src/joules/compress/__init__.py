"""Compression: recipes of registered steps applied to Hugging Face models, saved and reloaded.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, info = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "gptq(format=int4-g32)", calibration=calib)
    >>> cm.manifest.bits_per_weight
    4.5

Layout (as llm-compressor groups its modifiers): the core is :mod:`~joules.compress.recipe`
(the grammar and the step registry), :mod:`~joules.compress.context`, :mod:`~joules.compress.api`
(compress, save, load) and :mod:`~joules.compress.manifest`; :mod:`joules.compress.steps` holds
one module per method (``joules compress --help`` lists them), each imported automatically;
:mod:`joules.compress.modules` the compressed linear and its kernels; :mod:`joules.compress.solvers`
the Hessian, knapsack and weight-fitting solvers. A new step is one ``@dataclass`` config
registered with :func:`register_step` in one file under ``steps/``.
"""

# Importing the steps package registers every built-in step (and, through them, the module
# types their layers save as); kernels register when modules.kernels is imported below.
from joules.compress import steps  # noqa: F401
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
from joules.compress.manifest import Manifest
from joules.compress.modules.kernels import Kernel
from joules.compress.modules.kernels import register as register_kernel
from joules.compress.modules.linear import (
    CompressedLinear,
    compressed_linears,
    layer_paths,
    linear_paths,
    prepack,
    register_module,
    set_kernels,
)
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
