"""What the benchmark scripts share: the header a results JSON starts with, writing it, the
command-line flags every script spells the same way (:func:`parser`), and keeping finished rows
so a stopped run resumes (:func:`resume` for rows inside the results JSON, :class:`RowCache` for
one file per row under the joules cache), and a plotly figure as a PNG for the docs
(:func:`figure_png`).

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

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joules.fingerprint import cache_key, library_versions, sha
from joules.paths import cache_dir
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


def figure_png(
    fig: Any, path: Path, *, window: tuple[int, int] = (1120, 640), check: bool = True
) -> Path | None:
    """Render a plotly figure (plotly.js inlined: no network) into the PNG ``path`` with headless
    chromium; None when no chromium is installed. ``check``: a failed render raises."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(
            page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}/profile", "--virtual-time-budget=5000", "--hide-scrollbars",
             f"--window-size={window[0]},{window[1]}", f"--screenshot={Path(path).resolve()}",
             page.as_uri()],
            check=check, capture_output=True, timeout=120,
        )  # fmt: skip
    return path


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


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

# The flags several scripts take: name -> (type, help, what a default of None means). A switch
# (type bool) is off by default; every other flag's default is the script's own.
SHARED_FLAGS: dict[str, tuple[type, str, str | None]] = {
    "model": (str, "model spec: a registry name, a file or a directory", None),
    "threads": (int, "torch intra-op threads", "all logical cores"),
    "tokens": (int, "WikiText-2 test tokens scored", None),
    "window": (int, "tokens per perplexity window", None),
    "calib_n": (int, "calibration sequences (WikiText-2 valid)", None),
    "calib_len": (int, "tokens per calibration sequence", None),
    "repeats": (int, "timed repeats of each measurement", None),
    "force": (bool, "recompute rows the results JSON already holds", None),
    "table": (
        bool,
        "re-derive the results JSON's table rows from its measured rows, write it back and "
        "print the table (nothing re-measured)",
        None,
    ),
    "markdown": (bool, "print the README table(s) from the results JSON (nothing measured)", None),
}


def parser(doc: str | None, *, out: Path | None = None, **flags: Any) -> argparse.ArgumentParser:
    """An argument parser whose description is the script's docstring (its layout kept), with
    ``--out`` (the results JSON, default ``out``) when ``out`` is given, and each shared flag
    named in ``flags`` (see :data:`SHARED_FLAGS`: ``model``, ``threads``, ``tokens``,
    ``window``, ``calib_n``, ``calib_len``, ``repeats``, ``force``, ``table``, ``markdown``) with
    the value given as the script's default; a switch (``force``, ``table``, ``markdown``) is
    added when its value is True. Script-specific flags are added to the result as usual.

    >>> ap = parser("Demo.", out=Path("results/demo.json"), model="smollm2-135m", threads=None,
    ...             tokens=4096, force=True, table=False)
    >>> a = ap.parse_args(["--threads", "2", "--force"])
    >>> a.out.as_posix(), a.model, a.threads, a.tokens, a.force, hasattr(a, "table")
    ('results/demo.json', 'smollm2-135m', 2, 4096, True, False)
    >>> parser("Demo.", thread=2)
    Traceback (most recent call last):
    ...
    TypeError: parser() has no shared flag 'thread' (known: model, threads, ..., markdown)
    """
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if out is not None:
        ap.add_argument(
            "--out", type=Path, default=out, help="the results JSON (default: %(default)s)"
        )
    for name, default in flags.items():
        if name not in SHARED_FLAGS:
            known = ", ".join(SHARED_FLAGS)
            raise TypeError(f"parser() has no shared flag {name!r} (known: {known})")
        kind, text, if_none = SHARED_FLAGS[name]
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            if default:
                ap.add_argument(flag, action="store_true", help=text)
            continue
        shown = if_none if default is None and if_none else "%(default)s"
        ap.add_argument(flag, type=kind, default=default, help=f"{text} (default: {shown})")
    return ap


# ----------------------------------------------------------------------------------------------
# Finished rows, kept so a stopped run resumes
# ----------------------------------------------------------------------------------------------


def resume(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results JSON at ``path`` when its ``settings`` equal ``settings`` (the rows an
    interrupted run of the same settings finished, to be kept), else ``{}`` (no file, or other
    settings: everything is measured again).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "demo.json"
    >>> resume(path, {"tokens": 4096})
    {}
    >>> _ = write_json(path, {"settings": {"tokens": 4096}, "rows": {"baseline": 1}})
    >>> resume(path, {"tokens": 4096})["rows"], resume(path, {"tokens": 16384})
    ({'baseline': 1}, {})
    """
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if data.get("settings") == settings else {}


class RowCache:
    """Finished rows of a long benchmark, one JSON file each under
    ``joules.paths.cache_dir()/bench-NAME/`` (``root`` instead of the cache directory, for
    tests), so a stopped run resumes row by row. A row's file is ``ROW_ID-KEY.json``: ``KEY``
    is :func:`joules.fingerprint.cache_key` of ``settings`` (what every row shares: the model's
    content hash, the protocol), taken once when the cache is made (joules code, library
    versions and compute path of that moment), hashed with the row's own ``inputs`` (its
    configuration) where given; ``ROW_ID`` names the row for people (characters other than
    letters, digits, ``.``, ``_`` and ``-`` become ``_``).

    >>> import tempfile
    >>> rows = RowCache("demo", {"model": "tiny", "streams": 2}, root=Path(tempfile.mkdtemp()))
    >>> rows.get("int4 kivi", {"bits": 4}) is None
    True
    >>> _ = rows.put("int4 kivi", {"ppl": 12.5}, {"bits": 4})
    >>> rows.get("int4 kivi", {"bits": 4}), rows.get("int4 kivi", {"bits": 2})
    ({'ppl': 12.5}, None)
    >>> f = rows.path("int4 kivi", {"bits": 4})
    >>> f.parent.name, f.name.startswith("int4_kivi-")
    ('bench-demo', True)
    """

    def __init__(self, name: str, settings: Any, *, root: Path | None = None) -> None:
        self.folder = (cache_dir() if root is None else root) / f"bench-{name}"
        self.settings = settings
        # probed once: a script that sets a compute variable mid-run keeps finding its rows
        self._key = cache_key(settings, 12)

    def path(self, row_id: str, inputs: Any = None) -> Path:
        """The file of row ``row_id`` (configured by ``inputs``)."""
        key = self._key if inputs is None else sha([self._key, inputs], 12)
        return self.folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', row_id)}-{key}.json"

    def get(self, row_id: str, inputs: Any = None) -> Any | None:
        """The kept row, or None where it was not finished under these settings."""
        f = self.path(row_id, inputs)
        return json.loads(f.read_text()) if f.is_file() else None

    def put(self, row_id: str, value: Any, inputs: Any = None) -> Path:
        """Keep a finished row (atomically: a kill mid-write leaves no half row)."""
        return write_json(self.path(row_id, inputs), value, indent=None)
