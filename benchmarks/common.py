"""What the benchmark scripts share: the header a results JSON starts with, and writing it.

Every script runs from the repository root as ``python benchmarks/NAME.py``. Python puts the
script's own folder first on ``sys.path``, so ``from common import header`` finds this file with
no ``sys.path`` edit (a test that loads a script by path puts the folder there the same way).

    >>> h = header("benchmarks/formats.py", ["--reps", "2"])
    >>> h["command"], sorted(h)
    ('python benchmarks/formats.py --reps 2', ['command', 'created_utc', 'load_avg_1m_at_start', 'machine', 'versions'])
    >>> "cpu_flags" in h["machine"] and "joules_code" in h["versions"]
    True
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joules.fingerprint import library_versions
from joules.serialize import atomic_write_json
from joules.system import machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran ``script`` (its path from the repository root, as
    ``benchmarks/formats.py``): ``argv``, else this process's arguments."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", script, *args])


def machine() -> dict[str, Any]:
    """The machine a result was measured on: :func:`joules.system.machine_info` (CPU model and
    ISA flags, cores, memory, GPUs, Python, platform and package versions)."""
    return machine_info()


def load_avg_1m() -> float | None:
    """The 1-minute load average (a shared machine's load decides how far absolute timings
    can be trusted), or None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def header(script: str, argv: list[str] | None = None) -> dict[str, Any]:
    """What a ``benchmarks/results/*.json`` starts with: the command that wrote it, the UTC
    date, the library versions (:func:`joules.fingerprint.library_versions`, the fingerprint
    of the code that ran included), :func:`machine` and the load average at the start."""
    info = machine()
    info.pop("packages", None)  # the versions are the header's own field
    return {
        "command": command(script, argv),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "machine": info,
        "load_avg_1m_at_start": load_avg_1m(),
    }


def write_json(path: str | Path, data: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """``data`` as JSON at ``path``, atomically (a kill mid-write leaves the old file), its
    folder made first; ``kwargs`` go to ``json.dumps`` (``default=str``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data, indent=indent, **kwargs)


def median_time_s(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one burn-in call (the format and kernel
    tables report a typical call, not the best one a speed probe wants)."""
    fn()  # burn-in
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def retable_file(
    out: Path, retable: Callable[[dict], dict], table: Callable[[dict, str], str]
) -> int:
    """A script's ``--table`` mode: re-derive ``out``'s table rows from its measured rows with
    ``retable``, write it back atomically and print the table (marker name ``results/NAME``)."""
    data = retable(json.loads(out.read_text()))
    write_json(out, data, indent=1)
    print(table(data, f"results/{out.name}"))
    return 0
