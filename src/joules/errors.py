"""Exception types of joules.

Every error a user can cause (a missing model path, an unknown format, a malformed data file)
is raised as a subclass of :class:`JoulesError` with a one-line message that names the problem
and the fix. The CLI prints that line and exits with status 2 instead of showing a traceback.

    >>> from joules.errors import JoulesError
    >>> try:
    ...     raise ModelNotFoundError("no model at 'x': pass smollm2-135m, an HF dir or a .gguf file")
    ... except JoulesError as e:
    ...     print(e)
    no model at 'x': pass smollm2-135m, an HF dir or a .gguf file
"""

from __future__ import annotations


class JoulesError(Exception):
    """Base class of every error joules raises on bad input or a missing resource."""


class ModelNotFoundError(JoulesError):
    """A model spec names nothing that exists (path, package or preset)."""


class UnsupportedModelError(JoulesError):
    """The model exists but joules cannot load it (architecture, file layout)."""


class DataError(JoulesError):
    """A data set, split or user data file is missing or malformed."""


class ConfigError(JoulesError):
    """A configuration value (format spec, method config, CLI flag) is invalid."""


class MeterError(JoulesError):
    """An energy meter cannot be read (missing device, permission denied)."""
