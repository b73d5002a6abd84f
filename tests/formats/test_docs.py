"""The usage examples in the formats modules' docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "base",
    "packing",
    "integer",
    "minifloat",
    "nf4",
    "mx",
    "nxfp",
    "ternary",
    "codebook",
    "error",
    "fitted",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name):
    mod = importlib.import_module(f"joules.formats.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
