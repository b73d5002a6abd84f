"""Multiple-choice knapsack: one option per layer, total bits within a budget, least error.

    >>> from joules.compress.solvers.knapsack import solve, brute_force
    >>> costs = [[3, 4, 8], [3, 4, 8], [6, 8, 16]]
    >>> errors = [[9.0, 4.0, 0.1], [1.0, 0.5, 0.0], [20.0, 5.0, 0.2]]
    >>> s = solve(costs, errors, budget=20)
    >>> s.choice, s.cost, s.exact, s.choice == brute_force(costs, errors, 20)
    ([2, 1, 1], 20, True, True)

:func:`solve` is an exact dynamic programme over total cost in units of the gcd of every option's
cost (layer bit costs share large common factors, so the table stays small); when the budget
would still need more than ``max_states`` cells, costs are rounded *up* to a coarser unit, which
can only under-use the budget (never exceed it; if rounding leaves nothing feasible the cheapest
option per layer is the start), and the solution is marked ``exact=False``.
Either way :func:`fill_slack` then applies single-layer upgrades that fit the remaining slack
(exact costs), best error reduction per bit first, until none is affordable -- so no single-layer
upgrade fits in the slack of the result. The solution never exceeds the budget.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from joules.errors import ConfigError


@dataclass
class Solution:
    choice: list[int]  # option index per layer
    cost: int
    error: float
    exact: bool  # optimal (True) or from rounded-up costs + slack filling (False)
    unit: int  # cost unit of the table


def _check(costs: list[list[int]], errors: list[list[float]], budget: int) -> None:
    if len(costs) != len(errors) or any(
        len(c) != len(e) or not c for c, e in zip(costs, errors, strict=True)
    ):
        raise ValueError("costs and errors must have one non-empty option list per layer")
    least = sum(min(c) for c in costs)
    if least > budget:
        raise ConfigError(
            f"the budget of {budget} bits is below the cheapest choice ({least} bits): raise it"
        )


def solve(
    costs: list[list[int]], errors: list[list[float]], budget: int, max_states: int = 400_000
) -> Solution:
    """Least total error with ``sum(cost) <= budget`` (see the module docstring)."""
    _check(costs, errors, budget)
    g = 0
    for c in itertools.chain.from_iterable(costs):
        g = math.gcd(g, int(c))
    unit, exact = max(g, 1), True
    if budget // unit > max_states:
        unit, exact = -(-budget // max_states), False
    cap = budget // unit
    ucost = [[-(-int(c) // unit) for c in row] for row in costs]
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = []
    for row_c, row_e in zip(ucost, errors, strict=True):
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for k, (c, e) in enumerate(zip(row_c, row_e, strict=True)):
            if c > cap:
                continue
            cand = dp[: cap + 1 - c] + float(e)
            better = cand < new[c:]
            new[c:][better] = cand[better]
            arg[c:][better] = k
        dp = new
        picks.append(arg)
    end = int(np.argmin(dp))
    choice = [min(range(len(c)), key=c.__getitem__) for c in costs]  # cheapest: always feasible
    if np.isfinite(dp[end]):  # (rounded-up costs may leave no feasible cell: keep the cheapest)
        j = end
        for i in range(len(costs) - 1, -1, -1):
            k = int(picks[i][j])
            choice[i] = k
            j -= ucost[i][k]
    choice = fill_slack(choice, costs, errors, budget)
    return Solution(
        choice,
        sum(costs[i][k] for i, k in enumerate(choice)),
        sum(errors[i][k] for i, k in enumerate(choice)),
        exact,
        unit,
    )


def fill_slack(
    choice: list[int], costs: list[list[int]], errors: list[list[float]], budget: int
) -> list[int]:
    """Apply affordable single-layer upgrades (lower error, extra cost <= slack) until none fits."""
    choice = list(choice)
    while True:
        slack = budget - sum(costs[i][k] for i, k in enumerate(choice))
        best, best_gain = None, 0.0
        for i, k in enumerate(choice):
            for j, (c, e) in enumerate(zip(costs[i], errors[i], strict=True)):
                extra, gain = c - costs[i][k], errors[i][k] - e
                if gain > 0 and extra <= slack:
                    rate = gain / max(extra, 1)
                    if best is None or rate > best_gain:
                        best, best_gain = (i, j), rate
        if best is None:
            return choice
        choice[best[0]] = best[1]


def affordable_upgrades(
    choice: list[int], costs: list[list[int]], errors: list[list[float]], budget: int
) -> list[tuple[int, int]]:
    """Every (layer, option) with lower error whose extra cost fits the slack (should be [])."""
    slack = budget - sum(costs[i][k] for i, k in enumerate(choice))
    return [
        (i, j)
        for i, k in enumerate(choice)
        for j in range(len(costs[i]))
        if errors[i][j] < errors[i][k] and costs[i][j] - costs[i][k] <= slack
    ]


def brute_force(costs: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Exhaustive search (tests): the least-error feasible choice (first one on ties)."""
    _check(costs, errors, budget)
    best, best_e = None, math.inf
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][k] for i, k in enumerate(combo))
        if cost <= budget:
            e = sum(errors[i][k] for i, k in enumerate(combo))
            if e < best_e:
                best, best_e = list(combo), e
    assert best is not None
    return best
