"""The name under which a Hugging Face model takes and returns its KV cache.

transformers up to 5.24 calls it ``past_key_values``; 5.25 renamed it ``cache`` (the old
keyword still works inside ``forward`` through a deprecation shim, but *hooks* that read the
keyword arguments before ``forward`` runs see only the name the caller used, and ``generate``
now passes ``cache=``). Every place joules hands a cache to a model or reads it back goes through
these three functions, so a future rename is one edit here.

    >>> from joules.models import tiny_model
    >>> from joules.models.hf_cache import cache_kwarg, output_cache
    >>> model, _, _ = tiny_model()
    >>> cache_kwarg(model) in ("cache", "past_key_values")
    True
    >>> import torch
    >>> out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    >>> output_cache(out) is not None
    True
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from joules.errors import UnsupportedModelError

# Oldest name first: a forward that accepts both (a shim) is given the new one.
CACHE_KWARGS = ("cache", "past_key_values")

_BY_CLASS: dict[type, str] = {}


def cache_kwarg(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache under (``cache`` or ``past_key_values``).

    Raises :class:`UnsupportedModelError` when it takes neither: a KV policy or a decode loop
    would otherwise run without the cache it asked for, silently.
    """
    cls = type(module)
    if cls not in _BY_CLASS:
        params = inspect.signature(module.forward).parameters
        name = next((n for n in CACHE_KWARGS if n in params), None)
        if name is None:
            raise UnsupportedModelError(
                f"{cls.__name__}.forward takes no KV cache argument (looked for "
                f"{' or '.join(CACHE_KWARGS)}): joules cannot hand it a cache; "
                "use a transformers causal LM"
            )
        _BY_CLASS[cls] = name
    return _BY_CLASS[cls]


def given_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """The cache a caller passed in ``kwargs`` under either name: ``(name, cache)``.

    ``(None, None)`` when the caller passed none.
    """
    for name in CACHE_KWARGS:
        if name in kwargs:
            return name, kwargs[name]
    return None, None


def output_cache(out: Any) -> Any:
    """The KV cache a model's output carries (``out.cache`` on 5.25+, else ``past_key_values``)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in CACHE_KWARGS:
        if name in keys:
            return out[name]
    for name in CACHE_KWARGS:
        # A plain ``dir`` check: 5.25 keeps ``past_key_values`` as a warning property.
        if name in getattr(type(out), "__dataclass_fields__", {}):
            return getattr(out, name)
    return None
