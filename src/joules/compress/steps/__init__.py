"""The built-in compression steps: one module per method, each registering its ``@dataclass``
config with :func:`joules.compress.recipe.register_step` when it is imported.

Every module in this folder is imported here, found with :func:`pkgutil.iter_modules` rather
than listed, so a new built-in step is one file and nothing else to edit (as llm-compressor
groups its modifiers). Steps import the core (:mod:`joules.compress.recipe`,
:mod:`joules.compress.context`, :mod:`joules.compress.api`), the solvers and the compressed
modules; none of those imports a step, so the layers inside ``compress/`` point one way.
Modules are imported in name order, which is also the order the steps register in.
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_all() -> tuple[str, ...]:
    """Import every non-private module in this package; return their names, sorted."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return tuple(names)


# The step modules this package found and imported (a test checks each registers a step).
STEP_MODULES: tuple[str, ...] = _import_all()

__all__ = ["STEP_MODULES"]
