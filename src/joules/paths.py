"""Where joules keeps what it can recompute: the cache root (ground floor, no heavy imports).

>>> from joules.paths import cache_dir
>>> cache_dir()  # ~/.cache/joules unless $JOULES_CACHE_DIR is set  # doctest: +SKIP
PosixPath('/home/me/.cache/joules')
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The joules cache root (``$JOULES_CACHE_DIR`` or ``~/.cache/joules``)."""
    return Path(os.environ.get("JOULES_CACHE_DIR", Path.home() / ".cache" / "joules"))
