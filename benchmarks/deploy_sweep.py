"""Time ``joules sweep examples/deploy.toml`` from an empty store and cache, then its re-run, then
the answer: ``joules recommend --max-kld 0.05 --objective energy --export ship.gguf``.

    .venv/bin/python benchmarks/deploy_sweep.py

Runs the CLI as a user does, in a fresh temporary directory with ``JOULES_CACHE_DIR`` pointing at
a new empty folder (so the default model's conversion, the machine probe, every compression,
export, evaluation and bench are inside the first figure). Writes
``benchmarks/results/deploy_sweep.json`` atomically: the header (command, versions, machine with
CPU flags, load average), both wall times, the sweep's JSON summary and the recommendation's JSON,
and whether llama.cpp loads the exported ``ship.gguf``. Run it with nothing else on the machine.
The default model's weights were Q4_1 before joules saw them (see the spec's comment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, header, load_avg_1m, parser, write_json

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "deploy.toml"


def _joules(args: list[str], env: dict[str, str], cwd: str) -> tuple[float, dict]:
    exe = str(Path(sys.executable).with_name("joules"))
    t0 = time.perf_counter()
    proc = subprocess.run([exe, *args, "--json"], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"joules {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-800:]}"
        )
    return wall, json.loads(proc.stdout)


def rows(first_s: float, again_s: float, rec: dict) -> list[dict]:
    """The docs' table: both sweeps' wall times and the file the recommendation shipped."""
    chosen = (rec.get("chosen") or {}).get("recipe")
    return [
        {"step": "sweep, empty store and cache", "wall_s": round(first_s, 1), "ships": None},
        {"step": "sweep again (re-does nothing)", "wall_s": round(again_s, 1), "ships": None},
        {"step": "recommend --max-kld 0.05 --export ship.gguf", "wall_s": None, "ships": chosen},
    ]


def main() -> int:
    args = parser(__doc__, out=RESULTS / "deploy_sweep.json").parse_args()
    head = header("benchmarks/deploy_sweep.py")
    with tempfile.TemporaryDirectory(prefix="joules-deploy-sweep-") as tmp:
        env = dict(os.environ, JOULES_CACHE_DIR=str(Path(tmp) / "cache"))
        store = str(Path(tmp) / "deploy.db")
        load_before = load_avg_1m()
        first_s, summary = _joules(["sweep", str(SPEC), "--store", store], env, tmp)
        load_after = load_avg_1m()
        again_s, again = _joules(["sweep", str(SPEC), "--store", store], env, tmp)
        ship = Path(tmp) / "ship.gguf"
        rec_s, rec = _joules(
            ["recommend", store, "--max-kld", "0.05", "--objective", "energy", "--export",
             str(ship)], env, tmp,
        )  # fmt: skip
        check = subprocess.run(
            [sys.executable, "-c", "import sys; from joules.deploy.llamacpp import load_llama; "
             "load_llama(sys.argv[1], n_ctx=64); print('ok')", str(ship)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
    data = {
        **head,
        "spec": str(SPEC.relative_to(ROOT)),
        "first_run_wall_s": round(first_s, 1),
        "rerun_wall_s": round(again_s, 1),
        "recommend_wall_s": round(rec_s, 1),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after_first": load_after,
        "sweep": summary,
        "rerun": again,
        "recommendation": rec,
        "ship_gguf_loads_in_llamacpp": check.returncode == 0 and "ok" in check.stdout,
        "rows": rows(first_s, again_s, rec),
        "notes": [
            "an empty store and an empty JOULES_CACHE_DIR: the first figure includes the "
            "default model's GGUF conversion and the machine probe",
            "the default model's weights were Q4_1 before joules saw them",
        ],
    }
    write_json(args.out, data)
    chosen = (rec.get("chosen") or {}).get("recipe")
    print(f"first run {first_s:.0f} s, re-run {again_s:.1f} s; ship: {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
