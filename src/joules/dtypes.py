"""The one map between dtype names and torch dtypes (ground floor).

    >>> import torch
    >>> from joules import dtypes
    >>> dtypes.to_torch("bf16"), dtypes.to_torch("bfloat16"), dtypes.to_torch("torch.int8")
    (torch.bfloat16, torch.bfloat16, torch.int8)
    >>> dtypes.short_name(torch.float32), dtypes.torch_name(torch.float32)
    ('fp32', 'float32')
    >>> dtypes.choices("fp32", "bf16")
    {'fp32': torch.float32, 'bf16': torch.bfloat16}

Two spellings exist and both are kept, each where it is already written down: the *short*
names (``fp32``, ``bf16``, ``fp16``, ``fp64``) are what flags, configs, protocols and results
say; the *torch* names (``float32``, ``bfloat16``, ``int8``...) are what manifests, sweep
stores and ``str(torch.float32)`` say. Every module used to keep its own partial dict of one or
the other; this one answers both ways, and an unknown name raises one
:class:`~joules.errors.ConfigError` naming the valid ones.
"""

from __future__ import annotations

import torch

from joules.errors import ConfigError

# Floating-point dtypes by their short name, widest first.
SHORT: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_SHORT_OF = {dt: name for name, dt in SHORT.items()}

# Every dtype a compressed model stores, by its torch name (``str(dtype)`` without ``torch.``).
TORCH: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


# torch's own aliases (``torch.half`` is ``torch.float16``...).
ALIASES = {"half": "fp16", "float": "fp32", "double": "fp64"}


def to_torch(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a short (``bf16``), torch (``bfloat16``), ``torch.``-prefixed or
    alias (``half``) name, in any case."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key in SHORT:
        return SHORT[key]
    if key in TORCH:
        return TORCH[key]
    raise ConfigError(f"unknown dtype {name!r}: valid dtypes are {', '.join([*SHORT, *TORCH])}")


def float_dtype(name: str | torch.dtype) -> torch.dtype:
    """:func:`to_torch` restricted to the floating-point dtypes of :data:`SHORT`."""
    try:
        dt = to_torch(name)
    except ConfigError:
        dt = None
    if dt not in _SHORT_OF:
        raise ConfigError(f"unknown dtype {name!r}: valid dtypes are {', '.join(SHORT)}")
    return dt


def is_known(name: str) -> bool:
    """True when :func:`to_torch` knows ``name``."""
    try:
        to_torch(name)
    except ConfigError:
        return False
    return True


def short_name(dt: torch.dtype) -> str:
    """``fp32``/``bf16``/``fp16``/``fp64`` for a float dtype, else its torch name (``int8``)."""
    return _SHORT_OF.get(dt) or torch_name(dt)


def torch_name(dt: torch.dtype) -> str:
    """``float32``, ``bfloat16``, ``int8``...: ``str(dtype)`` without the ``torch.`` prefix."""
    return str(dt).removeprefix("torch.")


def choices(*names: str) -> dict[str, torch.dtype]:
    """``{short name: dtype}`` for the names a caller accepts, in the order given."""
    return {n: to_torch(n) for n in names}


__all__ = [
    "ALIASES",
    "SHORT",
    "TORCH",
    "choices",
    "float_dtype",
    "is_known",
    "short_name",
    "to_torch",
    "torch_name",
]
