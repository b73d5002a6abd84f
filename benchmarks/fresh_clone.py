"""Time the README's set-up commands as a new user meets them: a fresh clone, an empty pip cache.

    .venv/bin/python benchmarks/fresh_clone.py                  # clones this checkout's HEAD
    .venv/bin/python benchmarks/fresh_clone.py --steps install,test  # skip the demo

Clones HEAD of this repository into a temporary directory, points ``PIP_CACHE_DIR`` and
``JOULES_CACHE_DIR`` at new empty directories, and times ``make install`` (the venv from the
committed lock, llama-cpp-python compiled from source), ``make test`` and ``make demo`` one after
the other, each as its own wall-clock figure. Writes ``benchmarks/results/fresh_clone.json``
atomically with the commit, the machine (CPU model and flags, cores), the load average before
and after each step, and the tail of each step's output; the README's set-up times are checked
against that file. Run it with nothing else on the machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from common import RESULTS, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS / "fresh_clone.json"
STEPS = ("install", "test", "demo")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def _run_step(step: str, clone: Path, env: dict[str, str]) -> dict[str, object]:
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["make", step], cwd=clone, env=env, capture_output=True, text=True, check=False
    )
    wall_s = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {
        "command": f"make {step}",
        "wall_s": round(wall_s, 1),
        "returncode": proc.returncode,
        "load_avg_1m_before": round(load_before[0], 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "output_tail": tail,
    }


def table_rows(steps: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    """One row per timed step, for the README table (its marker reads ``rows``)."""
    rows = []
    for r in steps.values():
        wall_s = float(r["wall_s"])  # type: ignore[arg-type]
        minutes, seconds = divmod(round(wall_s), 60)
        rows.append(
            {
                "command": r["command"],
                "wall_s": wall_s,
                "wall": f"{minutes} min {seconds:02d} s",
                "exit": r["returncode"],
                "load_avg_1m_before": r["load_avg_1m_before"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS)
    )
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument(
        "--table", action="store_true", help="re-derive the table rows of the existing JSON only"
    )
    args = ap.parse_args(argv)
    if args.table:
        record = json.loads(OUT.read_text())
        record["rows"] = table_rows(record["steps"])
        write_json(OUT, record)
        return 0
    steps = [s for s in args.steps.split(",") if s]
    bad = sorted(set(steps) - set(STEPS))
    if bad:
        print(f"unknown steps {bad}: choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2

    commit = _git("rev-parse", "HEAD")
    work = Path(tempfile.mkdtemp(prefix="joules-fresh-"))
    clone = work / "joules"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "JOULES_"))}
    env["PIP_CACHE_DIR"] = str(work / "pip-cache")
    env["JOULES_CACHE_DIR"] = str(work / "joules-cache")

    results: dict[str, object] = {}
    for step in steps:
        print(f"make {step} ...", flush=True)
        results[step] = r = _run_step(step, clone, env)
        print(f"  {r['wall_s']} s, exit {r['returncode']}", flush=True)
        if r["returncode"] != 0:
            break

    record = {
        "what": "README set-up commands from a fresh clone with an empty pip cache and joules cache",
        "command": "python benchmarks/fresh_clone.py --steps " + ",".join(steps),
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "steps": results,
        "rows": table_rows(results),  # type: ignore[arg-type]
        "notes": (
            "make install includes compiling llama-cpp-python from source (pip's cache was empty); "
            "make test and make demo reuse the venv make install built."
        ),
    }
    write_json(OUT, record)
    print(f"wrote {OUT.relative_to(ROOT)}")
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1  # type: ignore[index]


if __name__ == "__main__":
    raise SystemExit(main())
