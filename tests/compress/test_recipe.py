"""Recipes: string and TOML round trips, registry, one-line errors."""

from __future__ import annotations

import pytest

from joules.compress import Recipe, parse_recipe, step_names
from joules.compress.steps.gptq import GPTQ
from joules.compress.steps.rtn import RTN
from joules.errors import ConfigError


def test_builtin_steps_registered():
    assert {"rtn", "gptq"} <= set(step_names())


@pytest.mark.parametrize(
    "text",
    [
        "rtn(format=int8-ch)",
        "gptq(format=int4-g64)",
        "gptq(format=int4-g64, act_order=false, damp=0.05, block_size=64)",
        "rtn(format=int8-ch, targets=[lm_head, '*.mlp.*']) | gptq(format=mxfp4)",
    ],
)
def test_string_round_trip(text):
    r = parse_recipe(text)
    assert parse_recipe(r.to_string()) == r
    assert Recipe.from_dict(r.to_dict()) == r


def test_values_are_typed():
    r = parse_recipe("gptq(format=int4-g64, act_order=false, damp=0.05, block_size=64)")
    step = r.steps[0]
    assert isinstance(step, GPTQ)
    assert (step.act_order, step.damp, step.block_size) == (False, 0.05, 64)
    r = parse_recipe("rtn(format=int8-ch, targets=lm_head)")
    assert isinstance(r.steps[0], RTN) and r.steps[0].targets == ("lm_head",)


def test_baseline_is_empty():
    assert parse_recipe("baseline").steps == [] and parse_recipe("").to_string() == "baseline"


def test_toml_round_trip(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(
        '[[step]]\nname = "rtn"\nformat = "int8-ch"\ntargets = ["lm_head"]\n'
        '[[step]]\nname = "gptq"\nformat = "int4-g64"\nact_order = false\n'
    )
    r = parse_recipe(p)
    assert r == parse_recipe(
        "rtn(format=int8-ch, targets=[lm_head]) | gptq(format=int4-g64, act_order=false)"
    )
    assert parse_recipe(str(p)) == r


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("foo(format=int4)", "unknown compression step 'foo': valid compression steps are"),
        ("gptq(fromat=int4-g64)", "gptq has no key 'fromat': valid keys are"),
        ("gptq(int4-g64)", "keyword arguments only"),
        ("gptq()", "gptq needs 'format'"),
        ("gptq(format=int4-g64, damp=abc)", "gptq.damp = 'abc': expected a number"),
        ("gptq(format=int4-g64, act_order=1)", "expected true or false"),
        ("gptq(format=int9)", "gptq(format=int9)"),
        ("gptq(format=int4-g64, damp=2)", "damp=2.0: use a value in [0, 1)"),
        ("rtn(format=int8-ch", "unbalanced"),
        ("rtn(format=int8-ch) | | gptq(format=int4)", "cannot read step 2"),
    ],
)
def test_bad_recipes_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_recipe(text)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_bad_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[[step]]\nformat = "int8"\n')
    with pytest.raises(ConfigError, match="missing 'name'"):
        parse_recipe(p)
    p.write_text("[[step]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_recipe(p)
    with pytest.raises(ConfigError, match="no recipe file"):
        parse_recipe(tmp_path / "missing.toml")
