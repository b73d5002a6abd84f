"""Quality of compression recipes on the default model: perplexity, paired intervals, bits, cost.

    python benchmarks/compress.py                  # every row (about 45 min on 2 cores)
    python benchmarks/compress.py --rows "rtn(format=int8-ch)" --tokens 4096   # a quick subset
    python benchmarks/compress.py --table          # reprint the table from the JSON

Every recipe is compressed by the real CLI in its own process (`joules compress ... --json`),
so its time and peak RSS are that process's own; the saved directory is then loaded back and
scored on the first ``--tokens`` WikiText-2 **test** tokens (calibration: WikiText-2 valid).
Each row is compared with the baseline by the paired per-window NLL difference (95 % interval).
Rows already in ``benchmarks/results/compress.json`` with the same settings are not recomputed, so an
interrupted run resumes. The default model's weights were Q4_1 before joules saw them: the
baseline is an fp32 copy of Q4_1 values, and ``uint4-asym-g32`` (which reproduces Q4_1) is a
check of the path, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import command, machine, resume, write_json
from joules.serialize import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compress.json"

ROWS = [
    "baseline",
    "rtn(format=uint4-asym-g32)",
    "rtn(format=int8-ch)",
    "rtn(format=int4-g64)",
    "gptq(format=int4-g64)",
    # AWQ (issue 12): scales + clipping then RTN; and as GPTQ's pre-step
    "awq(format=int4-g64)",
    "awq(format=int4-g64) | gptq(format=int4-g64)",
    "rtn(format=int3-g64)",
    "gptq(format=int3-g64)",
    "rtn(format=mxfp4)",
    "gptq(format=mxfp4)",
    "rtn(format=nxfp4)",
    "gptq(format=nxfp4)",
    "rtn(format=nf4)",
    "gptq(format=nf4)",
    "rtn(format=codebook4)",
    "gptq(format=codebook4)",
]


def _joules_cmd() -> list[str]:
    return [sys.executable, "-c", "from joules.cli import main; main()"]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "tokens": args.tokens,
        "window": args.window,
        "calib_n": args.calib_n,
        "calib_len": args.calib_len,
        "threads": args.threads,
    }


def _compress(recipe: str, args: argparse.Namespace, cache: Path) -> tuple[Path, dict[str, Any]]:
    # The compressed model depends on the calibration and threads, not on how many test tokens
    # score it: a run with more tokens re-scores the models a shorter run compressed.
    calib = {k: v for k, v in _settings(args).items() if k not in ("tokens", "window")}
    # every default of the recipe, the model's content, the joules code, versions, compute path
    from joules.compress.recipe import expand_recipe
    from joules.fingerprint import cache_key
    from joules.models.loading import model_identity

    key = cache_key([expand_recipe(recipe), calib, model_identity(args.model)["sha256"]])
    out = cache / key
    if not (out / "joules.json").is_file():
        cmd = [*_joules_cmd(), "compress", args.model, "--recipe", recipe, "-o", str(out)]
        cmd += ["--calib-n", str(args.calib_n), "--calib-len", str(args.calib_len), "--json"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{recipe}: joules compress failed: {proc.stderr.strip()[-400:]}")
        wall = time.perf_counter() - t0
        atomic_write_text(out / "bench_wall_s.txt", f"{wall:.3f}\n")
    manifest = json.loads((out / "joules.json").read_text())
    wall = (
        float((out / "bench_wall_s.txt").read_text())
        if (out / "bench_wall_s.txt").exists()
        else None
    )
    return out, {"manifest": manifest, "process_wall_s": wall}


def _score(model_path: str, args: argparse.Namespace) -> Any:
    from joules.evaluate.perplexity import wikitext2_perplexity
    from joules.models import load_model

    model, tok, info = load_model(model_path)
    r = wikitext2_perplexity(model, tok, limit_tokens=args.tokens, window=args.window)
    paths: dict[str, int] = {}
    for m in model.modules():
        p = getattr(m, "path", None)
        if isinstance(p, str):
            paths[p] = paths.get(p, 0) + 1
    return r, info, paths


def run(
    args: argparse.Namespace, out: Path = OUT, default_rows: list[str] = ROWS
) -> dict[str, Any]:
    import torch

    from joules.fingerprint import library_versions
    from joules.models.loading import cache_dir

    torch.set_num_threads(args.threads)
    settings = _settings(args)
    data = resume(out, settings)  # rows an interrupted run of the same settings finished
    data.update(
        settings=settings,
        command=command(f"benchmarks/{Path(sys.argv[0]).name}"),
        versions=library_versions(),  # joules_code: the fingerprint of the code that ran
        machine=machine(),
    )
    rows: dict[str, Any] = data.setdefault("rows", {})
    cache = cache_dir() / "bench-compress"
    cache.mkdir(parents=True, exist_ok=True)

    wanted = args.rows or default_rows
    if "baseline" not in wanted:
        wanted = ["baseline", *wanted]
    for recipe in wanted:
        if recipe in rows and not args.force:
            continue
        print(f"-- {recipe}", flush=True)
        entry: dict[str, Any] = {"recipe": recipe}
        if recipe == "baseline":
            r, info, paths = _score(args.model, args)
            entry.update(
                bits_per_weight=None,
                model_bytes=info.bytes,
                note=f"fp32 copy of the {info.prequantized} weights the model shipped with",
            )
        else:
            try:
                path, comp = _compress(recipe, args, cache)
            except RuntimeError as exc:  # recorded nowhere: a re-run tries the row again
                print(f"   skipped: {exc}", flush=True)
                continue
            r, info, paths = _score(str(path), args)
            m = comp["manifest"]
            step = m["steps"][0]
            entry.update(
                bits_per_weight=m["bits_per_weight"],
                model_bytes=m["model_bytes"],
                compress_time_s=sum(s["time_s"] for s in m["steps"]),
                compress_peak_rss_bytes=max(s["peak_rss_bytes"] for s in m["steps"]),
                process_wall_s=comp["process_wall_s"],
                step=step["name"],
                calibration=m.get("calibration"),
                extras=_extras(m),
            )
        entry["linear_paths"] = paths
        entry["perplexity"] = r.to_dict()
        rows[recipe] = entry
        write_json(out, data, indent=1)
    finish(data)
    write_json(out, data, indent=1)
    return data


def _result_of(d: dict[str, Any]) -> Any:
    from joules.evaluate.results import PerplexityResult

    return PerplexityResult.from_dict(d)


def finish(data: dict[str, Any]) -> None:
    """Paired differences against the baseline, gaps closed, and the README rows."""
    from joules.evaluate.paired import paired_difference
    from joules.system import backfill_machine

    backfill_machine(data)  # runs begun before joules.system had CPU flags
    rows = data["rows"]
    base = _result_of(rows["baseline"]["perplexity"])
    for entry in rows.values():
        entry["paired_vs_baseline"] = paired_difference(
            _result_of(entry["perplexity"]), base
        ).to_dict()
    _gap_closed(rows)
    data["table"] = table_rows(data)


def _extras(manifest: dict[str, Any]) -> dict[str, float]:
    """Layer-averaged sparsity and head-clustering savings, where the recipe has them."""
    layers = manifest["layers"].values()
    out: dict[str, float] = {}
    for key in ("sparsity", "score_flops_saving", "k_cache_saving", "score_patterns"):
        vals = [float(e[key]) for e in layers if key in e]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def _gap_closed(rows: dict[str, Any]) -> None:
    """For each non-RTN row, the share of the RTN row's NLL gap (same format) it closes."""
    for recipe, entry in rows.items():
        if recipe.startswith("rtn(") or recipe == "baseline":
            continue
        fmt = recipe.split("format=", 1)[-1].split(")")[0].split(",")[0]
        rtn = rows.get(f"rtn(format={fmt})")
        if not rtn:
            continue
        g_rtn = rtn["paired_vs_baseline"]["delta_nll"]
        g = entry["paired_vs_baseline"]["delta_nll"]
        entry["gap_closed_vs_rtn"] = (g_rtn - g) / g_rtn if g_rtn > 0 else None


def table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat object per README row: exactly the figures the table shows."""
    out = []
    for recipe, e in data["rows"].items():
        pv = e.get("paired_vs_baseline") or {}
        ex = e.get("extras") or {}
        gap = e.get("gap_closed_vs_rtn")
        if "score_patterns" in ex:
            note = (
                f"{ex['score_patterns']:.1f} score patterns/layer, score FLOPs "
                f"-{100 * ex['score_flops_saving']:.0f} %, K cache -{100 * ex['k_cache_saving']:.0f} %"
            )
        elif "sparsity" in ex:
            note = f"sparsity {100 * ex['sparsity']:.1f} %"
        elif e.get("activations"):  # benchmarks/compress_more.py's W8A8 / W4A4 rows
            note = f"activations {e['activations']}"
        else:
            note = None
        rss = e.get("compress_peak_rss_bytes")
        out.append(
            {
                "recipe": recipe,
                "bits_per_weight": e.get("bits_per_weight") or 32.0,
                "perplexity": e["perplexity"]["perplexity"],
                "ppl_ratio": pv.get("ppl_ratio"),
                "ppl_ratio_lo": (pv.get("ppl_ratio_ci95") or [None])[0],
                "ppl_ratio_hi": (pv.get("ppl_ratio_ci95") or [None, None])[1],
                "gap_closed_pct": 100 * gap if gap is not None else None,
                "note": note,
                "compress_time_s": e.get("compress_time_s"),
                "peak_rss_gib": rss / 2**30 if rss else None,
            }
        )
    return out


def table(data: dict[str, Any], name: str = "compress") -> str:
    """The README table of ``benchmarks/results/{name}.json`` (compress, compress_more, prune,
    compress_awq): its marker ties every column to ``table`` rows in the JSON."""
    s = data["settings"]
    cols = [
        ("bits/weight", "bits_per_weight", 3),
        ("perplexity", "perplexity", 3),
        ("x baseline", "ppl_ratio", 4),
        ("95 % lo", "ppl_ratio_lo", 4),
        ("95 % hi", "ppl_ratio_hi", 4),
        ("gap closed vs RTN %", "gap_closed_pct", 0),
        ("notes", "note", None),
        ("compress s", "compress_time_s", 0),
        ("peak RSS GiB", "peak_rss_gib", 2),
    ]
    rows = table_rows(data)
    used = [c for c in cols if any(r[c[1]] is not None for r in rows)]
    lines = [
        f"{s['tokens']} WikiText-2 test tokens, window {s['window']}, calibration "
        f"{s['calib_n']} x {s['calib_len']} valid tokens, {s['threads']} thread(s):",
        "",
        f"<!-- bench: results/{name}.json rows=table key=recipe cols="
        + "; ".join(f"{h}={f}" for h, f, _ in used)
        + " -->",
        "| recipe | " + " | ".join(h for h, _, _ in used) + " |",
        "|---" * (len(used) + 1) + "|",
    ]
    for r in rows:
        cells = []
        for _, f, dec in used:
            v = r[f]
            cells.append("-" if v is None else (str(v) if dec is None else f"{v:.{dec}f}"))
        recipe = r["recipe"].replace("|", "\\|")  # a pipe inside a cell is escaped
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _recipes(text: str) -> list[str]:
    return [r.strip() for r in text.split(";") if r.strip()]


def parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """The flags of this script and of those that share its protocol (compress_more, prune)."""
    ap = common.parser(
        doc,
        model="smollm2-135m",
        tokens=16384,
        window=512,
        calib_n=128,
        calib_len=256,
        threads=2,
        force=True,
        table=True,
    )
    ap.add_argument("--rows", type=_recipes, help="recipes to run, separated by ';'")
    ap.add_argument(
        "--results", type=Path, help="with --table: another JSON of this layout (a snapshot)"
    )
    return ap


def retable(path: Path) -> dict[str, Any]:
    """Re-derive the paired figures and ``table`` rows of a results JSON from its measured rows
    (nothing is re-measured) and write it back."""
    data = json.loads(path.read_text())
    finish(data)
    write_json(path, data, indent=1)
    return data


def main() -> None:
    args = parser().parse_args()
    if args.table:  # re-derive the paired figures from what the JSON holds (cheap)
        path = args.results or OUT
        print(table(retable(path), path.stem))
    else:
        print(table(run(args)))


if __name__ == "__main__":
    main()
