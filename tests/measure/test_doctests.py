"""The usage examples in every measure module's docstring run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "__init__",
    "base",
    "carbon",
    "stats",
    "estimate",
    "detect",
    "rapl",
    "nvml",
    "amd",
    "idle",
    "power",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module("joules.measure" + ("" if name == "__init__" else f".{name}"))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0  # a module with no example fails
