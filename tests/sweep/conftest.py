"""Fixtures of the sweep tests: the issue's spec with fake recipes, and a fake-stage sweep."""

from __future__ import annotations

import pytest

from joules.sweep.spec import parse_spec
from joules.testing.sweep import fake_recipe

HARDWARE = ("this-machine", "h100")

SPEC = """\
models = ["tiny"]
recipes = ["baseline", "round(bits=8)", "round(bits=4)", "round(bits=2)"]

[eval]
tasks = ["wikitext2"]
limit_tokens = 512
window = 64

[bench]
prompt_len = [16]
gen_len = 4

[predict]
hardware = ["this-machine", "h100"]
"""


def fake_spec(text: str = SPEC, **kwargs):
    return parse_spec(
        text, check_models=False, recipe_parser=fake_recipe, hardware=HARDWARE, **kwargs
    )


@pytest.fixture
def make_spec():
    """parse_spec with the fake recipe parser (round(bits=N)) and a fixed hardware list."""
    return fake_spec


@pytest.fixture
def spec_text():
    return SPEC


@pytest.fixture
def spec():
    return fake_spec()
