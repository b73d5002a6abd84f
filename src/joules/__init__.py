"""joules: find the most energy-efficient way to run a machine-learning model, with measurements.

    >>> import joules
    >>> model, tokenizer, info = joules.load_model("smollm2-135m")   # doctest: +SKIP
    >>> text = joules.load_text("wikitext2", "test")                  # doctest: +SKIP

The public API is re-exported here; each subpackage documents its own usage.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from joules.errors import (
    ConfigError,
    DataError,
    JoulesError,
    MeterError,
    ModelNotFoundError,
    UnsupportedModelError,
)

# torchao (imported by transformers) warns at import that its CUDA-only kernels cannot load on
# a CPU machine, and torch warns about a deprecated pytree call torchao makes: neither concerns
# joules users, and both would interleave with tables. Real errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

try:
    __version__ = version("joules")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # Lazy re-exports: `import joules` stays fast (no torch/transformers import) so that
    # `joules --version` and `joules measure -- CMD` start in well under a second.
    if name == "load_model":
        # compress registers the loader of compressed directories (models sits below it)
        from joules import compress, models  # noqa: F401

        return models.load_model
    if name in {"tiny_model", "ModelInfo", "LoadedModel"}:
        from joules import models

        return getattr(models, name)
    if name in {"load_text", "load_choice", "ChoiceItem"}:
        from joules import data

        return getattr(data, name)
    raise AttributeError(f"module 'joules' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DataError",
    "JoulesError",
    "MeterError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "__version__",
]
