"""compress/ is grouped: core, steps/ (found, not listed), modules/, solvers/; saved names stay."""

from __future__ import annotations

import ast
from pathlib import Path

import joules.compress
from joules.compress import step_names, steps
from joules.compress.api import RUNTIME_HOOKS
from joules.compress.modules.linear import MODULES
from joules.compress.recipe import STEPS

PACKAGE = Path(joules.compress.__file__).parent


def test_every_file_in_steps_is_imported_and_registers_a_step():
    files = sorted(p.stem for p in (PACKAGE / "steps").glob("*.py") if not p.stem.startswith("_"))
    assert list(steps.STEP_MODULES) == files
    registered_in = {STEPS.get(name).__module__ for name in step_names()}
    for name in files:
        assert f"joules.compress.steps.{name}" in registered_in, (
            f"steps/{name}.py registers no step"
        )


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from a import b`` counts as ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def test_compress_init_lists_no_step_module():
    # Adding a step is one file: the package imports the steps package, never a step by name.
    imported = _imported(PACKAGE / "__init__.py")
    assert "joules.compress.steps" in imported
    assert not [m for m in imported if m.startswith("joules.compress.steps.")]


def test_lower_groups_never_import_a_step():
    # steps import the core, the solvers and the modules; none of those imports a step.
    lower = [*PACKAGE.glob("*.py"), *(PACKAGE / "modules").glob("*.py")]
    lower += (PACKAGE / "solvers").glob("*.py")
    for path in lower:
        if path == PACKAGE / "__init__.py":
            continue  # the package imports the steps package to register them
        bad = [m for m in _imported(path) if m.startswith("joules.compress.steps")]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_saved_names_unchanged_by_the_move():
    # A saved directory's manifest names its module types, steps and runtime hooks, never a
    # module path: a directory saved before compress/ was grouped loads after it.
    assert {
        "act_quant",
        "act_quant_linear",
        "compressed_linear",
        "outlier_columns",
        "pruned_linear",
        "sparse_outliers",
    } <= set(MODULES.names())
    assert {
        "act_quant",
        "awq",
        "gptq",
        "heads",
        "kvcache",
        "mixed",
        "outliers",
        "prune",
        "rtn",
        "smoothquant",
    } <= set(step_names())
    assert "kv_cache" in RUNTIME_HOOKS.names()
