"""Quality of activation quantization, dense-and-sparse outliers and mixed precision (issue 13).

    python bench/compress_more.py                  # every row, 16,384 test tokens (hours on 2 cores)
    python bench/compress_more.py --tokens 4096 --calib-n 32   # what the README table ran
    python bench/compress_more.py --table          # reprint the table from the JSON

Same protocol as ``bench/compress.py`` (whose helpers it reuses): each recipe is compressed by the
real CLI in its own process, loaded back, scored on the first ``--tokens`` WikiText-2 **test**
tokens (calibration: WikiText-2 valid) and compared with the baseline by the paired per-window
NLL difference (95 % interval); rows already in ``bench/results/compress_more.json`` with the same
settings are kept, so an interrupted run resumes. The ``mixed`` family is compressed once; each
member is scored by moving the loaded model to it with ``switch_member`` (the bytes each move
reads are in the JSON). **Activation quantization is emulated on this CPU** (inputs rounded to
the format in fp32, matmul in fp32): the W8A8/W4A4 rows measure accuracy, not speed or energy.
The default model's weights were Q4_1 before joules saw them: the baseline is an fp32 copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress as base  # bench/compress.py: the shared protocol

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compress_more.json"

FAMILY_BITS = [3.5, 4, 4.25, 4.5, 5, 6]
FAMILY = (
    f"mixed(avg_bits=[{', '.join(f'{b:g}' for b in FAMILY_BITS)}], "
    "candidates=[int3-g64, int4-g64, int5-g64, int6-g64, int8-g64])"
)

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
    "rtn(format=int5-g64)",
    "rtn(format=int6-g64)",
    FAMILY,
]


def _score_member(path: Path, bits: float, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from joules.compress import load_compressed
    from joules.compress.mixed import switch_member
    from joules.evaluate.perplexity import wikitext2_perplexity

    model, tok, _ = load_compressed(path)
    moved = switch_member(model, path, bits)
    r = wikitext2_perplexity(model, tok, limit_tokens=args.tokens, window=args.window)
    return r, moved


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from joules import __version__
    from joules.evaluate.paired import paired_difference
    from joules.models.loading import cache_dir

    torch.set_num_threads(args.threads)
    settings = base._settings(args)
    data: dict[str, Any] = {}
    if OUT.is_file():
        data = json.loads(OUT.read_text())
        if data.get("settings") != settings:
            data = {}
    data.update(
        settings=settings,
        command="python bench/compress_more.py " + " ".join(sys.argv[1:]),
        versions={"joules": __version__, "torch": torch.__version__},
        machine=base._machine(),
        emulated="activation quantization is emulated (fake-quant in fp32) on this CPU",
    )
    rows: dict[str, Any] = data.setdefault("rows", {})
    cache = cache_dir() / "bench-compress"
    cache.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Paired intervals after every row, so an interrupted run leaves a usable table.
        if "baseline" in rows:
            ref = base._result_of(rows["baseline"]["perplexity"])
            for entry in rows.values():
                entry["paired_vs_baseline"] = paired_difference(
                    base._result_of(entry["perplexity"]), ref
                ).to_dict()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(data, indent=1))

    wanted = args.rows or ROWS
    if "baseline" not in wanted:
        wanted = ["baseline", *wanted]
    for recipe in wanted:
        print(f"-- {recipe}", flush=True)
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


def table(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"<!-- bench: results/compress_more.json ({s['tokens']} WikiText-2 test tokens, window "
        f"{s['window']}; calibration {s['calib_n']} x {s['calib_len']} valid tokens; "
        "activations emulated) -->",
        "| recipe | bits/weight | perplexity | × baseline (95 % paired CI) | compress time |",
        "|---|---|---|---|---|",
    ]
    for recipe, e in data["rows"].items():
        p = e["perplexity"]
        pv = e.get("paired_vs_baseline", {})
        bpw = f"{e['bits_per_weight']:.3f}" if e.get("bits_per_weight") else "32 (fp32)"
        ratio = (
            f"{pv['ppl_ratio']:.4f} ({pv['ppl_ratio_ci95'][0]:.4f}–{pv['ppl_ratio_ci95'][1]:.4f})"
            if pv
            else ""
        )
        t = f"{e['compress_time_s']:.0f} s" if e.get("compress_time_s") is not None else ""
        tag = " (A emulated)" if e.get("activations") else ""
        name = f"`mixed` family member @ {e['avg_bits']:g}" if e.get("family") else f"`{recipe}`"
        name = name.replace("|", "\\|")  # a pipe inside a table cell must be escaped
        lines.append(f"| {name}{tag} | {bpw} | {p['perplexity']:.3f} | {ratio} | {t} |")
    for fam, f in data.get("families", {}).items():
        lines.append("")
        lines.append(
            f"Family `{fam}` (RTN candidates, Hessian-weighted errors): one store of "
            f"{f['store_bytes'] / 2**20:.1f} MiB; moving between neighbouring members rewrites:"
        )
        lines.append("")
        lines.append("| move (avg bits) | layers rewritten | bytes read |")
        lines.append("|---|---|---|")
        for mv in f["moves"]:
            lines.append(
                f"| {mv['from']:g} → {mv['to']:g} | {mv['layers']} | {mv['bytes'] / 2**20:.2f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=lambda s: [r.strip() for r in s.split(";") if r.strip()])
    ap.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--table", action="store_true", help="print the table from the JSON only")
    args = ap.parse_args()
    data = json.loads(OUT.read_text()) if args.table else run(args)
    print(table(data))


if __name__ == "__main__":
    main()
