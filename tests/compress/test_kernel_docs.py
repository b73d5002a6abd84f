"""The usage examples in the kernels and AWQ modules' docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["modules.kernels", "steps.awq"])
def test_module_examples(name: str) -> None:
    mod = importlib.import_module(f"joules.compress.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
