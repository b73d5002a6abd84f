"""The usage examples in the evaluation modules' docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "name", ["joules.evaluate.tasks", "joules.runtime_dtype", "joules.evaluate.choice"]
)
def test_module_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
