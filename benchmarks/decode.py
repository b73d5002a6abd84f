"""The decode table: eager vs compiled (and compressed models) on the default model, one run.

    $ flock /tmp/joules-heavy.lock python benchmarks/decode.py
    $ python benchmarks/decode.py --repeats 5 --model int8=/tmp/c/int8 --model int4-g64=/tmp/c/int4

Workload (the issue's target): batch 1, a 128-token WikiText-2 test prompt, 64 generated tokens,
2 threads, 1 warm-up and ``--repeats`` measured runs per row, every row in this one process.
Rows: eager fp32, compiled fp32 with the meter on, compiled fp32 with the meter off (the meter's
overhead), then one compiled row per ``--model NAME=DIR`` (compressed directories: their linears
run through a real kernel or emulated, the row says which).

The speed of light uses the *highest* of three bandwidths measured in this run: the probe's read
and triad (torch, 2 threads) and numpy's copy and triad (one thread, an independent
implementation), so an under-measured bandwidth cannot inflate the fractions. Writes
``benchmarks/results/decode.json`` (command, versions, machine, CPU flags, every BenchResult).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import parser, write_json
from joules.bench import BenchConfig, probe_machine, run_bench
from joules.bench.probe import MachineLimits
from joules.bench.runner import machine_record
from joules.models import load_model

OUT = Path(__file__).parent / "results" / "decode.json"
# Every row's perplexity comes from the compress table (one protocol for all rows: WikiText-2
# test, 16,384 tokens, window 512), looked up by the row's recipe; "baseline" for the fp32 rows.
COMPRESS_JSON = Path(__file__).parent / "results" / "compress.json"


def table_perplexity(recipe: str | None, path: Path = COMPRESS_JSON) -> float | None:
    """The compress table's perplexity for ``recipe`` (None: not in the table)."""
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("rows", {})
    r = rows.get(recipe or "baseline")
    return None if r is None else float(r["perplexity"]["perplexity"])


def numpy_bandwidth(buffer_bytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
    """STREAM copy and triad in numpy (one thread): bytes moved ÷ best time."""
    n = buffer_bytes // 8
    a, b, c = np.ones(n), np.ones(n), np.ones(n)
    best = {"copy": float("inf"), "triad": float("inf")}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.copyto(a, b)
        t1 = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        t2 = time.perf_counter()
        best["copy"] = min(best["copy"], t1 - t0)
        best["triad"] = min(best["triad"], t2 - t1)
    # copy moves 2 arrays; the two-op triad moves 5 (read c, write a, read a, read b, write a)
    return {
        "copy_bw_bytes_s": 2 * n * 8 / best["copy"],
        "triad_bw_bytes_s": 5 * n * 8 / best["triad"],
    }


def _manifest(path: str | None) -> dict:
    f = Path(path) / "joules.json" if path else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else {}


def row_summary(name: str, res, ppl: float | None, path: str | None = None) -> dict:
    r = res.rows[0]
    man = _manifest(path)
    recipe = man.get("recipe")
    if isinstance(recipe, dict):
        recipe = recipe.get("text") or recipe.get("string") or json.dumps(recipe)
    head = man.get("layers", {}).get("lm_head", {}).get("format")
    return {
        "row": name,
        "runtime": res.runtime,
        "recipe": recipe,
        "lm_head": head
        or f"dense {res.compute_dtype}"
        + (" (tied embedding)" if res.model_info.get("tied_embeddings") else ""),
        "compute_dtype": res.compute_dtype,
        "linear_paths": res.linear_paths,
        "linears": ", ".join(f"{k} {v}" for k, v in sorted(res.linear_paths.items())),
        "perplexity": ppl,
        "ttft_ms": 1e3 * r.ttft_s.median,
        "tpot_ms": 1e3 * r.tpot_s.median,
        "tpot_rel_ci95": r.tpot_s.relative_half_width,
        "prefill_tok_s": r.prefill_tok_s,
        "decode_tok_s": r.decode_tok_s,
        "decode_sol_tok_s": r.decode_sol_tok_s,
        "decode_sol_fraction": r.decode_sol_fraction,
        "prefill_sol_fraction": r.prefill_sol_fraction,
        "peak_rss_mib": r.peak_rss_bytes / 2**20,
        "model_mib": r.model_bytes / 2**20,
        "decode_j_per_token": r.decode_j_per_token,
        "prefill_j_per_token": r.prefill_j_per_token,
        "energy_method": r.decode_energy.method if r.decode_energy else None,
        "tokens": r.tokens,
    }


MARKER = (
    "<!-- bench: results/decode.json rows=rows key=row cols=recipe=recipe; lm_head=lm_head; "
    "compute=compute_dtype; linears=linears; ppl=perplexity; prefill tok/s=prefill_tok_s; "
    "decode tok/s=decode_tok_s; SoL tok/s=decode_sol_tok_s; % SoL=decode_sol_fraction*100; "
    "TPOT ms=tpot_ms; ±95 % of TPOT=tpot_rel_ci95*100; J/token decode=decode_j_per_token; "
    "peak RSS MiB=peak_rss_mib -->"
)


def markdown(path: Path) -> str:
    """The README table (with its test marker), printed from a written ``decode.json``."""
    d = json.loads(path.read_text())
    lines = [
        MARKER,
        "| row | recipe | lm_head | compute | linears | ppl | prefill tok/s | decode tok/s "
        "| SoL tok/s | % SoL | TPOT ms | ±95 % of TPOT | J/token decode | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] else "-"
        j = r["decode_j_per_token"]
        lines.append(
            f"| {r['row']} | {r['recipe'] or '-'} | {r['lm_head']} | {r['compute_dtype']} | "
            f"{r['linears']} | {ppl} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.2f} | "
            f"{r['decode_sol_tok_s']:.1f} | {100 * r['decode_sol_fraction']:.0f} | "
            f"{r['tpot_ms']:.1f} | {100 * r['tpot_rel_ci95']:.1f} | "
            + (f"{j:.3f} ({r['energy_method']})" if j else "-")
            + f" | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, out=OUT, repeats=5, threads=2, markdown=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--buffer-mib", type=int, default=256, help="bandwidth buffers (MiB)")
    ap.add_argument("--base", default="smollm2-135m", help="the baseline model spec")
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR of a compressed model")
    ap.add_argument(
        "--ppl",
        action="append",
        default=[],
        help="NAME=perplexity for a --model (default: its recipe's row in compress.json)",
    )
    ap.add_argument(
        "--kernel-dtype",
        choices=["bf16", "fp32", "probe"],
        default="bf16",
        help="activation dtype of the int8/int4 kernels (bf16: compress part 2's choice on "
        "AVX2 CPUs; probe: joules' per-CPU probe)",
    )
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    if args.kernel_dtype != "probe":
        os.environ["JOULES_KERNEL_DTYPE"] = args.kernel_dtype
    torch.set_num_threads(args.threads)
    t_start = time.time()

    load_at_start = os.getloadavg()[0]
    probe = probe_machine(args.threads, buffer_bytes=args.buffer_mib << 20)
    npbw = numpy_bandwidth(args.buffer_mib << 20)
    best_bw = max(probe.read_bw_bytes_s, probe.triad_bw_bytes_s, *npbw.values())
    limits = MachineLimits(**{**probe.to_dict(), "read_bw_bytes_s": best_bw})
    print(
        f"bandwidth GB/s: probe read {probe.read_bw_bytes_s / 1e9:.2f}, probe triad "
        f"{probe.triad_bw_bytes_s / 1e9:.2f}, numpy copy {npbw['copy_bw_bytes_s'] / 1e9:.2f}, "
        f"numpy triad {npbw['triad_bw_bytes_s'] / 1e9:.2f} -> using {best_bw / 1e9:.2f}",
        flush=True,
    )

    def cfg(runtime: str, energy: bool = True) -> BenchConfig:
        return BenchConfig(
            prompt_lens=(args.prompt_len,),
            gen_len=args.gen_len,
            repeats=args.repeats,
            runtime=runtime,
            threads=args.threads,
            energy=energy,
        )

    results, rows = {}, []
    model, tok, info = load_model(args.base)
    plan = [
        ("eager fp32", "eager", True),
        ("compiled fp32", "compiled", True),
        ("compiled fp32, meter off", "compiled", False),
    ]
    prepared: dict = {}  # the meter-off row reuses the compiled graphs of the meter-on row
    for name, runtime, energy in plan:
        t0 = time.time()
        res = run_bench(
            model, tok, info, cfg(runtime, energy), limits=limits, runtime_cache=prepared
        )
        results[name] = res.to_dict()
        rows.append(row_summary(name, res, table_perplexity("baseline")))
        print(f"{name}: {time.time() - t0:.0f} s, {json.dumps(rows[-1])[:400]}", flush=True)
    ppls = dict(x.split("=", 1) for x in args.ppl)
    for spec in args.model:
        name, path = spec.split("=", 1)
        m, t, i = load_model(path)
        t0 = time.time()
        res = run_bench(m, t, i, cfg("compiled"), limits=limits)
        results[name] = res.to_dict()
        row = row_summary(name, res, None, path)
        row["perplexity"] = float(ppls[name]) if name in ppls else table_perplexity(row["recipe"])
        rows.append(row)
        print(f"{name}: {time.time() - t0:.0f} s, {json.dumps(rows[-1])[:400]}", flush=True)

    on = results["compiled fp32"]["rows"][0]["tpot_s"]["median"]
    off = results["compiled fp32, meter off"]["rows"][0]["tpot_s"]["median"]
    eager_tokens = rows[0]["tokens"]
    summary = {
        "compiled_sol_fraction": rows[1]["decode_sol_fraction"],
        "compiled_over_eager_decode": rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"],
        "compiled_over_eager_prefill": rows[1]["prefill_tok_s"] / rows[0]["prefill_tok_s"],
        "compiled_tokens_equal_eager": rows[1]["tokens"] == eager_tokens,
        "meter_overhead": on / off - 1,
        "tpot_rel_ci95": {r["row"]: r["tpot_rel_ci95"] for r in rows},
    }
    for r in rows[3:]:
        summary[f"{r['row']}_over_compiled_fp32"] = r["decode_tok_s"] / rows[1]["decode_tok_s"]
    out = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_record(),
        "kernel_dtype": args.kernel_dtype,
        "perplexity_protocol": "benchmarks/results/compress.json: WikiText-2 test, first 16,384 "
        "tokens, window 512 (the row's recipe; baseline for the fp32 rows)",
        "load_avg_1m_at_start": load_at_start,
        "limits_probe": probe.to_dict(),
        "numpy_bandwidth": npbw,
        "bandwidth_used_bytes_s": best_bw,
        "baseline_note": "the default model's weights were Q4_1 (Q8_0 embedding) before joules "
        "loaded them; fp32 rows run an fp32 copy of those values",
        "rows": rows,
        "summary": summary,
        "results": results,
        "wall_s": time.time() - t_start,
    }
    write_json(args.out, out, indent=1, default=str)
    print()
    print(
        f"{'row':28s} {'decode tok/s':>12s} {'SoL %':>6s} {'TPOT ms':>8s} {'±%':>5s} "
        f"{'prefill tok/s':>13s} {'J/tok dec':>9s} {'paths'}"
    )
    for r in rows:
        print(
            f"{r['row']:28s} {r['decode_tok_s']:12.2f} {100 * r['decode_sol_fraction']:6.1f} "
            f"{r['tpot_ms']:8.2f} {100 * r['tpot_rel_ci95']:5.1f} {r['prefill_tok_s']:13.1f} "
            f"{r['decode_j_per_token'] or float('nan'):9.4f} {r['linear_paths']}"
        )
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
