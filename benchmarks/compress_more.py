"""Quality of activation quantization, dense-and-sparse outliers and mixed precision (issue 13).

    python benchmarks/compress_more.py             # every row, 128 x 256 calibration (hours on 2 cores)
    python benchmarks/compress_more.py --calib-n 32     # what the README table ran (16,384 tokens)
    python benchmarks/compress_more.py --table     # re-derive the table rows of the JSON

Same protocol as ``benchmarks/compress.py`` (whose helpers it reuses): each recipe is compressed by the
real CLI in its own process, loaded back, scored on the first ``--tokens`` WikiText-2 **test**
tokens (calibration: WikiText-2 valid) and compared with the baseline by the paired per-window
NLL difference (95 % interval); rows already in ``benchmarks/results/compress_more.json`` with the same
settings are kept, so an interrupted run resumes. Each ``mixed`` family is compressed once; each
member is scored by moving the loaded model to it with ``switch_member`` (the bytes each move
reads are in the JSON). **Activation quantization is emulated on this CPU** (inputs rounded to
the format in fp32, matmul in fp32): the W8A8/W4A4 rows measure accuracy, not speed or energy.
The default model's weights were Q4_1 before joules saw them: the baseline is an fp32 copy.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import compress as base  # benchmarks/compress.py: the shared protocol
from common import command, machine, resume, write_json

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compress_more.json"
COMPRESS = HERE / "results" / "compress.json"

FAMILY_BITS = [3.5, 4, 4.25, 4.5, 5, 6]
INT3_CANDIDATES = "candidates=[int3-g64, int4-g64, int5-g64, int6-g64, int8-g64]"
# the budgets with int3 among the candidates, under both additive sensitivities
FAMILIES_INT3 = [
    f"mixed(avg_bits=[{', '.join(f'{b:g}' for b in FAMILY_BITS)}], {INT3_CANDIDATES}, "
    f"sensitivity={sens})"
    for sens in ("hessian", "fisher")
]
# the default candidates (int4 at g128/g64/g32, int5, int6, int8) and sensitivity (fisher)
FAMILY = "mixed(avg_bits=[4.25, 4.5, 5, 6])"

ROWS = [
    "baseline",
    # W8A8
    "act_quant(format=int8) | rtn(format=int8-ch)",
    "smoothquant(alpha=0.5) | act_quant(format=int8) | rtn(format=int8-ch)",
    "act_quant(format=int8, granularity=per-tensor) | rtn(format=int8-ch)",
    "smoothquant(alpha=0.5) | act_quant(format=int8, granularity=per-tensor) | rtn(format=int8-ch)",
    # W4A4 (Atom-style outlier channels)
    "act_quant(format=int4-g64) | gptq(format=int4-g64)",
    "act_quant(format=int4-g64, outlier_channels=64) | gptq(format=int4-g64)",
    "act_quant(format=int4-g64, outlier_channels=128) | gptq(format=int4-g64)",
    # dense-and-sparse
    "rtn(format=int3-g64)",
    "outliers(fraction=0.005) | rtn(format=int3-g64)",
    "gptq(format=int3-g64)",
    "outliers(fraction=0.005) | gptq(format=int3-g64)",
    "rtn(format=int4-g64)",
    "outliers(fraction=0.005) | rtn(format=int4-g64)",
    "gptq(format=int4-g64)",
    "outliers(fraction=0.005) | gptq(format=int4-g64)",
    # codebooks (SqueezeLLM)
    "rtn(format=codebook4)",
    "outliers(fraction=0, criterion=sensitivity) | rtn(format=codebook4)",
    "outliers(fraction=0.005, criterion=sensitivity) | rtn(format=codebook4)",
    # uniform references for the mixed family
    "rtn(format=int4-g128)",
    "rtn(format=int4-g32)",
    "rtn(format=int5-g64)",
    "rtn(format=int6-g64)",
    FAMILY,
    *FAMILIES_INT3,
    # GPTQ-rounded candidates (on the unquantized model's Hessians) against sequential GPTQ
    "mixed(avg_bits=[4.25, 4.5, 5, 6], quantizer=gptq)",
    # only formats with a CPU kernel here (every layer of every member runs int4/int8 kernels)
    "mixed(avg_bits=[4.25, 4.5, 5, 6], candidates=[int4-g128, int4-g64, int4-g32, int8-ch])",
]


def _score_member(path: Path, bits: float, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from joules.compress import load_compressed
    from joules.compress.steps.mixed import switch_member
    from joules.evaluate.perplexity import wikitext2_perplexity

    model, tok, _ = load_compressed(path)
    moved = switch_member(model, path, bits)
    r = wikitext2_perplexity(model, tok, limit_tokens=args.tokens, window=args.window)
    return r, moved


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from joules.fingerprint import library_versions
    from joules.models.loading import cache_dir

    torch.set_num_threads(args.threads)
    settings = base._settings(args)
    out = args.results or OUT  # a second lane writes its own file; --merge joins them
    data = resume(out, settings)  # rows an interrupted run of the same settings finished
    # Rows benchmarks/compress.py measured under the same settings (same tokens, windows, calibration
    # and threads) are the same measurement: copied, and marked so, instead of run twice.
    shared: dict[str, Any] = resume(COMPRESS, settings).get("rows", {})
    data.update(
        settings=settings,
        command=command("benchmarks/compress_more.py"),
        versions=library_versions(),  # joules_code: the fingerprint of the code that ran
        machine=machine(),
        emulated="activation quantization is emulated (fake-quant in fp32) on this CPU",
    )
    rows: dict[str, Any] = data.setdefault("rows", {})
    cache = cache_dir() / "bench-compress"
    cache.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Paired intervals and table rows after every row, so an interrupted run leaves a table.
        if "baseline" in rows:
            finish(data)
        write_json(out, data, indent=1)

    wanted = args.rows or ROWS
    if "baseline" not in wanted:
        wanted = ["baseline", *wanted]
    for recipe in wanted:
        print(f"-- {recipe}", flush=True)
        if recipe in shared and (recipe not in rows or args.force):
            rows[recipe] = {
                **shared[recipe],
                "source": "benchmarks/results/compress.json (same settings)",
            }
            save()
            continue
        if recipe == "baseline":
            if recipe not in rows or args.force:
                r, info, paths = base._score(args.model, args)
                rows[recipe] = {
                    "recipe": recipe,
                    "bits_per_weight": None,
                    "model_bytes": info.bytes,
                    "note": f"fp32 copy of the {info.prequantized} weights the model shipped with",
                    "linear_paths": paths,
                    "perplexity": r.to_dict(),
                }
                save()
            continue
        path, comp = base._compress(recipe, args, cache)
        m = comp["manifest"]
        cost = {
            "compress_time_s": sum(s["time_s"] for s in m["steps"]),
            "compress_peak_rss_bytes": max(s["peak_rss_bytes"] for s in m["steps"]),
            "process_wall_s": comp["process_wall_s"],
            "calibration": m.get("calibration"),
        }
        acts = any("act_format" in v for v in m["layers"].values())
        fam = m.get("runtime", {}).get("mixed_family")
        if fam:
            for mem in fam["members"]:
                key = f"{recipe} @ {mem['avg_bits']:g}"
                if key in rows and not args.force:
                    continue
                print(f"   member {mem['avg_bits']:g}", flush=True)
                r, moved = _score_member(path, mem["avg_bits"], args)
                rows[key] = {
                    "recipe": key,
                    "family": recipe,
                    "bits_per_weight": mem["bits_per_weight"],
                    "avg_bits": mem["avg_bits"],
                    "knapsack_exact": mem["exact"],
                    "weighted_error": mem["error"],
                    "formats": sorted(set(mem["choice"].values())),
                    "move_from_installed": moved,
                    "model_bytes": m["model_bytes"],
                    "perplexity": r.to_dict(),
                    **cost,
                }
                save()
            data.setdefault("families", {})[recipe] = {
                "sensitivity": fam["sensitivity"],
                "quantizer": fam["quantizer"],
                "candidates": fam["candidates"],
                "moves": fam["moves"],
                "store_bytes": fam["store_bytes"],
                "members": [
                    {k: v for k, v in mem.items() if k != "choice"} for mem in fam["members"]
                ],
            }
            save()
            continue
        if recipe in rows and not args.force:
            continue
        r, info, paths = base._score(str(path), args)
        rows[recipe] = {
            "recipe": recipe,
            "bits_per_weight": m["bits_per_weight"],
            "model_bytes": m["model_bytes"],
            "activations": "emulated" if acts else None,
            "linear_paths": paths,
            "perplexity": r.to_dict(),
            **cost,
        }
        save()
    save()
    return data


UNIFORM = re.compile(r"^(?P<quantizer>rtn|gptq)\(format=int\d-g\d+\)$")


def finish(data: dict[str, Any]) -> None:
    """benchmarks/compress.py's paired figures and table rows, then :func:`vs_uniform`."""
    base.finish(data)
    vs_uniform(data)


def vs_uniform(data: dict[str, Any]) -> None:
    """Each family member paired against the uniform row of the same quantizer (RTN or GPTQ) at
    the nearest bits/weight, within a quarter bit (the one with more bits on a tie): the same
    windows, so the ratio's interval is tight. Members with no uniform row that near are left
    out."""
    from joules.compress import parse_recipe
    from joules.evaluate.paired import paired_difference

    rows = data["rows"]
    out = []
    for key, row in rows.items():
        if "family" not in row:
            continue
        quantizer = parse_recipe(row["family"]).steps[0].quantizer
        bits = row["bits_per_weight"]
        uniform = [
            r
            for r in rows
            if (m := UNIFORM.match(r))
            and m["quantizer"] == quantizer
            and abs(rows[r]["bits_per_weight"] - bits) <= 0.25 + 1e-3
        ]
        if not uniform:
            continue
        ref = min(
            uniform,
            key=lambda u: (abs(rows[u]["bits_per_weight"] - bits), -rows[u]["bits_per_weight"]),
        )
        pv = paired_difference(
            base._result_of(row["perplexity"]), base._result_of(rows[ref]["perplexity"])
        )
        out.append(
            {
                "member": key,
                "bits_per_weight": bits,
                "uniform": ref,
                "uniform_bits_per_weight": rows[ref]["bits_per_weight"],
                "ppl_ratio": pv.ppl_ratio,
                "ppl_ratio_lo": pv.ppl_ratio_ci95[0],
                "ppl_ratio_hi": pv.ppl_ratio_ci95[1],
                "significant": pv.significant,
            }
        )
    data["vs_uniform"] = out


def table(data: dict[str, Any]) -> str:
    """benchmarks/compress.py's table of the rows, then each ``mixed`` family's moves."""
    lines = [base.table(data, "compress_more")]
    for fam, f in data.get("families", {}).items():
        lines.append("")
        lines.append(
            f"Family `{fam}` ({f.get('quantizer', 'rtn').upper()} candidates, "
            f"{f.get('sensitivity', 'hessian')}-weighted errors): one store of "
            f"{f['store_bytes'] / 2**20:.1f} MiB; moving between neighbouring members rewrites:"
        )
        lines.append("")
        lines.append("| move (avg bits) | layers rewritten | bytes read |")
        lines.append("|---|---|---|")
        for mv in f["moves"]:
            lines.append(
                f"| {mv['from']:g} → {mv['to']:g} | {mv['layers']} | {mv['bytes'] / 2**20:.2f} MiB |"
            )
    if data.get("vs_uniform"):
        lines += [
            "",
            "Each member against the uniform format of its quantizer nearest in bits (within a "
            "quarter bit), paired:",
            "",
        ]
        lines.append(
            "<!-- bench: results/compress_more.json rows=vs_uniform key=member "
            "cols=bits/weight=bits_per_weight; uniform=uniform; "
            "its bits/weight=uniform_bits_per_weight; x uniform=ppl_ratio; "
            "95 % lo=ppl_ratio_lo; 95 % hi=ppl_ratio_hi -->"
        )
        lines.append(
            "| member | bits/weight | uniform | its bits/weight | x uniform | 95 % lo | 95 % hi |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for v in data["vs_uniform"]:
            member = v["member"].replace("|", "\\|")
            lines.append(
                f"| {member} | {v['bits_per_weight']:.3f} | {v['uniform']} | "
                f"{v['uniform_bits_per_weight']:.3f} | {v['ppl_ratio']:.4f} | "
                f"{v['ppl_ratio_lo']:.4f} | {v['ppl_ratio_hi']:.4f} |"
            )
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict[str, Any]:
    """Join the rows of lanes run with ``--results`` into ``compress_more.json`` (same settings
    required), then re-derive the table."""
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for p in paths:
        lane = json.loads(p.read_text())
        if data and data.get("settings") != lane.get("settings"):
            raise SystemExit(f"{p}: settings {lane.get('settings')} differ from {OUT}'s")
        rows = {**data.get("rows", {}), **lane.get("rows", {})}
        fams = {**data.get("families", {}), **lane.get("families", {})}
        data = {**lane, **{k: v for k, v in data.items() if k not in ("rows", "families")}}
        data["rows"], data["families"] = rows, fams
    finish(data)
    write_json(OUT, data, indent=1)
    return data


def main() -> None:
    ap = base.parser(__doc__)
    ap.add_argument("--merge", type=Path, nargs="+", help="lane JSONs to join into the results")
    args = ap.parse_args()
    if args.merge:
        print(table(merge(args.merge)))
        return
    if args.table:  # re-derive the paired figures from what the JSON holds (cheap)
        path = args.results or OUT
        data = json.loads(path.read_text())
        finish(data)
        write_json(path, data, indent=1)
        print(table(data))
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
