"""The multiple-choice knapsack equals brute force, never exceeds the budget, leaves no upgrade."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joules.compress.solvers.knapsack import affordable_upgrades, brute_force, solve
from joules.errors import ConfigError


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 5))
    costs, errors = [], []
    for _ in range(layers):
        k = draw(st.integers(1, 4))
        base = draw(st.integers(1, 6))
        cs = sorted(base * draw(st.integers(1, 9)) * 8 for _ in range(k))
        costs.append(cs)
        errors.append([draw(st.floats(0, 100, allow_nan=False)) for _ in range(k)])
    least = sum(min(c) for c in costs)
    most = sum(max(c) for c in costs)
    budget = draw(st.integers(least, most + 8))
    return costs, errors, budget


def _err(errors, choice):
    return sum(errors[i][k] for i, k in enumerate(choice))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_exact_equals_brute_force(p):
    costs, errors, budget = p
    s = solve(costs, errors, budget)
    assert s.exact
    assert s.cost <= budget
    assert s.error == pytest.approx(_err(errors, brute_force(costs, errors, budget)))
    assert affordable_upgrades(s.choice, costs, errors, budget) == []


@settings(max_examples=100, deadline=None)
@given(problems())
def test_approximate_never_exceeds_budget_and_leaves_no_upgrade(p):
    costs, errors, budget = p
    s = solve(costs, errors, budget, max_states=3)
    assert s.cost <= budget
    assert affordable_upgrades(s.choice, costs, errors, budget) == []
    assert s.error >= _err(errors, brute_force(costs, errors, budget)) - 1e-9


def test_budget_below_cheapest_is_an_error():
    with pytest.raises(ConfigError, match="below the cheapest"):
        solve([[8, 16]], [[1.0, 0.0]], 7)
