"""Plain JSON values from joules' typed results (one rule for the CLI, the store and exports).

>>> from joules.serialize import to_jsonable
>>> to_jsonable({"x": float("nan"), "t": (1, 2)})
{'x': None, 't': [1, 2]}
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, enums, paths, tuples and tensors into plain JSON values (NaN/inf -> None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist())
    return obj
