"""The usage examples in the fakes' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["measure", "sweep", "report"])
def test_docstring_examples(name: str) -> None:
    mod = importlib.import_module(f"joules.testing.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
