"""Sweeps: cross models × recipes × tasks × workloads × hardware, store every result, recommend.

    >>> from joules.sweep import parse_spec, run_sweep, Store, recommend, Constraints
    >>> spec = parse_spec('models = ["tiny"]\\nrecipes = ["baseline"]\\n[eval]\\nlimit_tokens = 256',
    ...                   check_models=False)
    >>> len(spec.runs())
    1

``spec.py`` parses and validates the TOML spec, ``runner.py`` executes runs (locally, one at a
time; ``ray_executor.py`` on a Ray cluster), ``store.py`` is the SQLite store, ``results.py``
turns results into figures with method and interval, ``analyze.py`` computes Pareto fronts and
recommendations, ``stages.py`` is the table of stages a run calls and ``fake.py`` its test fakes.
"""

from joules.sweep.analyze import Constraints, Recommendation, pareto_front, recommend
from joules.sweep.runner import SweepProgress, SweepSummary, library_versions, run_sweep
from joules.sweep.spec import RunConfig, SweepSpec, load_spec, parse_spec
from joules.sweep.stages import Stages, default_stages
from joules.sweep.store import Metric, RunRow, Store

__all__ = [
    "Constraints",
    "Metric",
    "Recommendation",
    "RunConfig",
    "RunRow",
    "Stages",
    "Store",
    "SweepProgress",
    "SweepSpec",
    "SweepSummary",
    "default_stages",
    "library_versions",
    "load_spec",
    "pareto_front",
    "parse_spec",
    "recommend",
    "run_sweep",
]
