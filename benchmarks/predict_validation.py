"""Validate ``joules predict``: leave-one-out error on this machine, and 7B models on GPUs.

    flock /tmp/joules-heavy.lock python benchmarks/predict_validation.py       # full run
    python benchmarks/predict_validation.py --published-only                   # GPU part only
    python benchmarks/predict_validation.py --refit     # refit the committed points (no measuring)

Part 1 (this machine). The default model (SmolLM2-135M; fp32 is an fp32 copy of weights that were
Q4_1 before joules saw them) is measured in three weight formats — fp32 (eager), and RTN int8-ch
and int4-g64 through torch's CPU weight-only kernels with bf16 activations — over a grid of
(prompt length, generated length, batch) points: time to first token (prefill) and median time
per decode step (TPOT), through ``joules.bench.run_bench``. For each point the predictor is
calibrated on the other points *of the same format* (see ``loo``) and predicts the held-out one (leave-one-out); the script
prints the mean absolute percentage error (MAPE) per phase, overall and per format, and the error
of the uncalibrated speed of light for reference. Each measured point is cached under
``$JOULES_CACHE_DIR/bench-predict``: a stopped run resumes. ``--refit`` re-derives part 1 from the
measured points and the machine description committed in the JSON (a minute of CPU, nothing
timed): what the current calibration code makes of the same measurements.

What a fit is. Every calibration records, per coefficient, whether it was ``fitted`` or kept
from the ``catalog``, and which fitted coefficients sit at a bound of the fit (``degenerate``:
an efficiency of 100x the probed peak, say). A degenerate fit is a curve through the points,
not a roofline they validate: its leave-one-out error says how well it interpolates this grid,
not that the model's roofs hold. The JSON and the README table say which fits are degenerate.

Energy: this VM has neither RAPL nor a GPU, so energy is *estimated* (CPU time x watts from the
hardware table). Fitting the energy model to the estimator and scoring it against the same
estimator would be circular, so no energy error is printed: it is reported only against a real
meter (RAPL or NVML).

Part 2 (uncalibrated GPUs). Llama-2-7B and Llama-3-8B shapes (``joules/data/configs``) are
predicted on the catalogued A100, H100 and RTX 4090 and compared with published batch-1 figures,
each cited in ``PUBLISHED`` below; the ratio is published / predicted (< 1: the real system
reaches that fraction of the speed of light).

Writes ``benchmarks/results/predict_validation.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from common import RowCache, parser, write_json

RESULTS = Path(__file__).parent / "results" / "predict_validation.json"

# phase -> (measured row key, attribute of a Prediction and an Observation)
PHASES = {"prefill": ("ttft_s", "prefill_s"), "decode": ("tpot_s", "tpot_s")}

# (prompt_len, gen_len, batch): 24 points, prompts 64-1024, generated 16-128, batch 1-8, sized to
# finish in about 10 minutes of 2 shared cores with eager fp32.
GRID = [
    (64, 16, 1),
    (64, 64, 1),
    (64, 128, 1),
    (128, 16, 1),
    (128, 32, 2),
    (128, 64, 4),
    (256, 16, 1),
    (256, 32, 1),
    (256, 16, 4),
    (256, 32, 8),
    (384, 16, 2),
    (512, 16, 1),
    (512, 64, 1),
    (512, 16, 2),
    (512, 32, 4),
    (768, 16, 1),
    (1024, 16, 1),
    (1024, 32, 1),
    (64, 32, 8),
    (128, 128, 1),
    (192, 48, 2),
    (320, 24, 1),
    (640, 16, 2),
    (96, 96, 2),
]

TORCHAO = "https://github.com/pytorch/ao/blob/{rev}/torchao/quantization/README.md"


def _decode_b1(
    source: str, short: str, url: str, hardware: str, config: str, rows: list[tuple]
) -> dict[str, Any]:
    """A published batch-1 decode figure set: 5-token prompt, 200 generated tokens."""
    return {
        "source": source,
        "short": short,
        "url": url,
        "hardware": hardware,
        "config": config,
        "phase": "decode",
        "rows": rows,
        "prompt_len": 5,
        "gen_len": 200,
    }


PUBLISHED = [
    _decode_b1(
        "torchao README, torchao/quantization/README.md (pytorch/ao, commit 03d01adc): "
        "'single A100 GPU', batch 1, torchao/_models/llama/generate.py (torch.compile)",
        "torchao README (A100)",
        TORCHAO.format(rev="03d01adcbcf8f85b0e61bef84957013b89e6902f"),
        "a100",
        "llama-2-7b",
        [
            ("bf16", "bf16", 107.38),
            ("int8wo", "int8-ch", 170.83),
            ("int4wo-64", "uint4-asym-g64", 201.14),
        ],
    ),
    _decode_b1(
        "torchao README (same table): Meta-Llama-3-8B on a single A100",
        "torchao README (A100)",
        TORCHAO.format(rev="03d01adcbcf8f85b0e61bef84957013b89e6902f"),
        "a100",
        "llama-3-8b",
        [
            ("bf16", "bf16", 95.64),
            ("int8wo", "int8-ch", 153.03),
            ("int4wo-64", "uint4-asym-g64", 180.80),
        ],
    ),
    _decode_b1(
        "gpt-fast README (pytorch-labs/gpt-fast, commit 0f925b5d), 'Benchmarks': "
        "A100-80GB power-limited to 330 W, batch 1, 5-token prompt",
        "gpt-fast README (A100 at 330 W)",
        "https://github.com/pytorch-labs/gpt-fast/blob/0f925b5d4ce457b89a7ca6c9ce50f42bf2576945/README.md",
        "a100",
        "llama-2-7b",
        [
            ("Base", "bf16", 104.9),
            ("8-bit", "int8-ch", 155.58),
            ("4-bit (G=32)", "uint4-asym-g32", 196.80),
        ],
    ),
    _decode_b1(
        "torchao README, torchao/quantization/README.md (pytorch/ao, 2025), "
        "'CUDA backend | NVIDIA-H100 GPU': Meta-Llama-3.1-8B (same shape as Llama-3-8B), batch 1",
        "torchao README (H100)",
        TORCHAO.format(rev="main"),
        "h100",
        "llama-3-8b",
        [
            ("bf16", "bf16", 126.90),
            ("int8wo", "int8-ch", 198.85),
            ("int4wo-64", "uint4-asym-g64", 241.39),
        ],
    ),
    {
        "source": "llama.cpp PR #4766 (ggml-backend integration), comment by ggerganov "
        "2024-01-10: llama-bench, codellama-7b, RTX 4090, pp 512 and tg 128",
        "short": "llama.cpp PR #4766",
        "url": "https://github.com/ggml-org/llama.cpp/pull/4766",
        "hardware": "rtx4090",
        "config": "llama-2-7b",
        "phase": "both",
        "rows": [
            ("F16 pp512", "fp16", 11048.22, "prefill"),
            ("F16 tg128", "fp16", 61.03, "decode"),
            ("Q8_0 pp512", "int8-g32", 7664.00, "prefill"),
            ("Q8_0 tg128", "int8-g32", 98.13, "decode"),
        ],
        "prompt_len": 512,
        "gen_len": 128,
    },
]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import joules

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "joules": joules.__version__,
    }


# -- part 2: published GPU figures -----------------------------------------------------------


def published_comparison() -> list[dict[str, Any]]:
    from joules.predict import ModelShape, Workload, predict

    out = []
    for pub in PUBLISHED:
        cfg = json.loads(
            resources.files("joules.data").joinpath(f"configs/{pub['config']}.json").read_text()
        )
        shape = ModelShape.from_config(cfg, name=pub["config"])
        for row in pub["rows"]:
            label, fmt, value = row[:3]
            phase = row[3] if len(row) > 3 else pub["phase"]
            wl = Workload(
                prompt_len=pub["prompt_len"],
                gen_len=pub["gen_len"],
                compute_dtype="fp16" if fmt == "fp16" else None,
            )
            p = predict(
                shape, pub["hardware"], wl, weight_format=fmt, head_format=fmt
            )  # these tools quantize the output linear too
            pred = p.decode_tok_s if phase == "decode" else p.prefill_tok_s
            out.append(
                {
                    "model": pub["config"],
                    "hardware": p.hardware,
                    "technique": label,
                    "format": fmt,
                    "phase": phase,
                    "published_tok_s": value,
                    "predicted_tok_s": pred,
                    "ratio": value / pred,
                    "bound": p.bound(phase),
                    "source": pub["source"],
                    "short": pub["short"],
                    "url": pub["url"],
                }
            )
    return out


# -- part 1: this machine --------------------------------------------------------------------


# Formats of part 1: dense fp32 (eager), and RTN int8 / int4 through torch's CPU weight-only
# kernels with bf16 activations (the kernel path of `joules.compress.modules.kernels`). RTN is
# enough: speed depends on the format's layout, not on how its values were chosen.
FORMATS = ("fp32", "int8-ch", "int4-g64")


def _point_id(fmt: str, p: int, g: int, b: int, repeats: int) -> str:
    return f"{fmt}-p{p}-g{g}-b{b}-r{repeats}"


def _load_format(fmt: str) -> tuple[Any, Any, Any]:
    from joules.models import load_model

    model, tok, info = load_model("smollm2-135m")
    if fmt != "fp32":
        from joules.compress import compress

        os.environ["JOULES_KERNEL_DTYPE"] = "bf16"  # the kernels' fast activation dtype here
        compress(model, f"rtn(format={fmt})")
    return model, tok, info


def measure_grid(
    grid: list[tuple[int, int, int]], repeats: int, formats: tuple[str, ...] = FORMATS
) -> tuple[list[dict], str]:
    """Measure every (format, grid point) with ``joules.bench.run_bench`` (eager); each point is
    written under ``$JOULES_CACHE_DIR/bench-predict`` as it finishes, so a stopped run resumes."""
    from joules.bench.config import BenchConfig
    from joules.bench.runner import run_bench
    from joules.models.loading import model_identity

    # joules code, library versions, compute path and the model's content are in the key too
    kept = RowCache("predict", model_identity("smollm2-135m")["sha256"])
    rows = []
    for fmt in formats:
        todo = [pt for pt in grid if kept.get(_point_id(fmt, *pt, repeats)) is None]
        model = tok = info = None
        if todo:
            model, tok, info = _load_format(fmt)
        for p, g, b in grid:
            point = _point_id(fmt, p, g, b, repeats)
            row = kept.get(point)
            if row is None:
                res = run_bench(
                    model,
                    tok,
                    info,
                    BenchConfig(prompt_lens=(p,), gen_len=g, batch_sizes=(b,), repeats=repeats),
                )
                d = res.to_dict()
                r = d["rows"][0]
                row = {
                    "format": fmt,
                    "compute_dtype": d["compute_dtype"],
                    "linear_paths": d["linear_paths"],
                    "prompt_len": p,
                    "gen_len": g,
                    "batch": b,
                    "ttft_s": r["ttft_s"]["median"],
                    "tpot_s": r["tpot_s"]["median"],
                }
                kept.put(point, row)
            rows.append(row)
            print(
                f"  {fmt:<9} p={p:5d} g={g:4d} b={b}: TTFT {row['ttft_s']:.3f} s, "
                f"TPOT {row['tpot_s'] * 1e3:.1f} ms ({row['compute_dtype']})",
                flush=True,
            )
        del model
    return rows, "joules.bench.run_bench (eager transformers; int formats via CPU kernels)"


def _observation(r: dict, shape: Any, label: str) -> Any:
    from joules.predict import Workload
    from joules.predict.calibrate import Observation

    wl = Workload(r["prompt_len"], r["gen_len"], r["batch"], compute_dtype=r["compute_dtype"])
    return Observation(shape, wl, r["format"], r["ttft_s"], r["tpot_s"], label=label)


def loo(rows: list[dict], hw: Any = None) -> dict[str, Any]:
    """Leave one point out, calibrate on the other points *of its format*, predict it.

    Per format, because one set of efficiencies cannot describe both: on this CPU (no bf16
    arithmetic) the weight-only kernels take bf16 activations but compute at several times the
    probed bf16 matmul peak, while fp32 runs below the fp32 peak; a calibration is made for the
    configuration a user will run (``joules predict calibrate --from`` its bench runs).

    ``hw``: the machine the rows were measured on (default: this one, probed now)."""
    from joules.predict import ModelShape, predict
    from joules.predict.calibrate import fit
    from joules.predict.catalog import this_machine
    from joules.predict.roofline import Coefficients

    shape, _ = ModelShape.load("smollm2-135m")
    hw = hw or this_machine()
    obs = [_observation(r, shape, str(i)) for i, r in enumerate(rows)]
    uncal = Coefficients.uncalibrated(hw)
    points = []
    for i, o in enumerate(obs):
        cal = fit(
            [x for j, x in enumerate(obs) if j != i and x.weight_format == o.weight_format], hw
        )
        kw = {"weight_format": o.weight_format}
        p = predict(shape, hw, o.workload, coefficients=cal.coefficients, **kw)
        u = predict(shape, hw, o.workload, coefficients=uncal, **kw)
        point = dict(rows[i])
        point |= {f"pred_{key}": getattr(p, attr) for key, attr in PHASES.values()}
        point |= {f"err_{ph}": getattr(p, a) / getattr(o, a) - 1 for ph, (_, a) in PHASES.items()}
        point |= {f"sol_{key}": getattr(u, attr) for key, attr in PHASES.values()}
        point |= {f"{ph}_bound": p.bound(ph) for ph in PHASES}
        point["loo_fit_degenerate"] = cal.coefficients.degenerate_summary() or None
        points.append(point)
    fmts = list(dict.fromkeys(r["format"] for r in rows))
    full = {f: fit([x for x in obs if x.weight_format == f], hw) for f in fmts}

    def summary(pts: list[dict]) -> dict[str, Any]:
        return {
            "n_points": len(pts),
            "loo_mape_pct": {
                ph: 100 * statistics.fmean(abs(x[f"err_{ph}"]) for x in pts) for ph in PHASES
            },
            "loo_max_abs_pct": {ph: 100 * max(abs(x[f"err_{ph}"]) for x in pts) for ph in PHASES},
            "sol_fraction_median": {
                ph: statistics.median(x[f"sol_{key}"] / x[key] for x in pts)
                for ph, (key, _) in PHASES.items()
            },
            "loo_fits_degenerate": f"{sum(bool(x['loo_fit_degenerate']) for x in pts)}/{len(pts)}",
        }

    def verdict(c: Any) -> str:
        d = c.coefficients.degenerate_summary()
        return f"degenerate: {d}" if d else "inside its bounds"

    per_format = {f: summary([x for x in points if x["format"] == f]) for f in fmts}
    for f, g in per_format.items():
        g["fit"] = verdict(full[f])
        g["roofs_decode_b1"] = _roofs(shape, hw, [r for r in rows if r["format"] == f])
    out = {
        "hardware": hw.to_dict(),
        "points": points,
        **summary(points),
        "per_format": per_format,
        "fit_all_points": {f: c.coefficients.to_dict() for f, c in full.items()},
        "fit_all_points_notes": {f: c.notes for f, c in full.items()},
    }
    n_deg = sum(bool(full[f].coefficients.degenerate) for f in fmts)
    out["fit"] = f"{n_deg} of {len(fmts)} per-format fits degenerate"
    out["readme_rows"] = readme_rows(out)
    return out


def _roofs(shape: Any, hw: Any, rows: list[dict]) -> dict[str, Any] | None:
    """At the first batch-1 point: measured time per decode step against its two roofs at
    100 % of the probed peaks (memory: bytes moved / bandwidth; compute: FLOPs / peak), in ms.
    A kernel far slower than both is limited by neither, which is why a fit can degenerate."""
    from joules.predict import Workload, predict
    from joules.predict.roofline import Coefficients

    r = next((r for r in rows if r["batch"] == 1 and r["gen_len"] > 1), None)
    if r is None:
        return None
    wl = Workload(r["prompt_len"], r["gen_len"], 1, compute_dtype=r["compute_dtype"])
    p = predict(shape, hw, wl, weight_format=r["format"], coefficients=Coefficients())
    steps = r["gen_len"] - 1
    dec = [o for o in p.operators if o.phase == "decode"]
    return {
        "prompt_len": r["prompt_len"],
        "gen_len": r["gen_len"],
        "measured_tpot_ms": 1e3 * r["tpot_s"],
        "memory_roof_ms": 1e3 * sum(o.memory_s for o in dec) / steps,
        "compute_roof_ms": 1e3 * sum(o.compute_s for o in dec) / steps,
    }


def readme_rows(tm: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the README's leave-one-out table (``tests/test_readme_tables.py`` checks
    the README against them)."""
    groups = dict(tm.get("per_format") or {})
    groups["all"] = tm
    dtypes = {x["format"]: x.get("compute_dtype") for x in tm["points"]}
    out = []
    for name, g in groups.items():
        dt = dtypes.get(name)
        for ph in PHASES:
            out.append(
                {
                    "weights": f"{name} ({dt})" if dt else "all formats",
                    "phase": ph,
                    "n_points": g["n_points"],
                    "loo_mape_pct": g["loo_mape_pct"][ph],
                    "loo_max_abs_pct": g["loo_max_abs_pct"][ph],
                    "sol_fraction_median": g["sol_fraction_median"][ph],
                    "fit": g.get("fit", "?"),
                    "loo_fits_degenerate": g["loo_fits_degenerate"],
                }
            )
    return out


def markdown(out: dict[str, Any]) -> str:
    """The README tables, printed from the results JSON."""
    lines = [
        "| model | hardware | weights | phase | published tok/s | predicted tok/s | ratio | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["published"]:
        lines.append(
            f"| {r['model']} | {r['hardware']} | {r['technique']} ({r['format']}) | {r['phase']} "
            f"| {r['published_tok_s']:,.1f} | {r['predicted_tok_s']:,.1f} | {r['ratio']:.2f} "
            f"| [{r['short']}]({r['url']}) |"
        )
    tm = out.get("this_machine")
    if tm:
        lines += [
            "",
            README_MARKER,
            "| weights (compute) | phase | points | leave-one-out MAPE | max abs. error "
            "| uncalibrated SoL / measured | fit on all points | degenerate LOO fits |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in tm.get("readme_rows") or readme_rows(tm):
            lines.append(
                f"| {r['weights']} | {r['phase']} | {r['n_points']} | {r['loo_mape_pct']:.1f} % "
                f"| {r['loo_max_abs_pct']:.1f} % | {r['sol_fraction_median']:.2f} | {r['fit']} "
                f"| {r['loo_fits_degenerate']} |"
            )
    return "\n".join(lines)


README_MARKER = (
    "<!-- bench: results/predict_validation.json rows=this_machine.readme_rows key=weights,phase "
    "cols=points=n_points; leave-one-out MAPE=loo_mape_pct; max abs. error=loo_max_abs_pct; "
    "uncalibrated SoL / measured=sol_fraction_median; fit on all points=fit; "
    "degenerate LOO fits=loo_fits_degenerate -->"
)


# the measured fields of a part-1 point (what ``measure_grid`` wrote); the rest is derived
MEASURED_KEYS = (
    "format",
    "compute_dtype",
    "linear_paths",
    "prompt_len",
    "gen_len",
    "batch",
    "ttft_s",
    "tpot_s",
)


def refit(old: dict[str, Any]) -> dict[str, Any]:
    """Part 1 re-derived from a results JSON's measured points and machine description: the
    same measurements through the current calibration code, nothing re-timed."""
    from joules.predict.catalog import HardwareSpec

    tm = old.get("this_machine")
    if not tm or not tm.get("points"):
        raise SystemExit(f"{RESULTS}: no measured points to refit (run without --refit)")
    rows = [{k: x[k] for k in MEASURED_KEYS if k in x} for x in tm["points"]]
    hw = HardwareSpec.from_dict(tm["hardware"])
    return loo(rows, hw)


def main() -> None:
    ap = parser(__doc__, repeats=1, markdown=True)
    ap.add_argument("--published-only", action="store_true")
    ap.add_argument(
        "--refit",
        action="store_true",
        help="refit part 1 from the points and machine committed in the JSON (no measuring)",
    )
    ap.add_argument("--points", type=int, default=len(GRID), help="first N grid points")
    ap.add_argument(
        "--formats", default=",".join(FORMATS), help="weights to measure (fp32, int8-ch, int4-g64)"
    )
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    if args.refit:
        old = json.loads(RESULTS.read_text())
        t0 = time.perf_counter()
        old["this_machine"] = refit(old)
        old["refit"] = {
            "command": "python " + " ".join(sys.argv),
            "versions": _versions(),
            "wall_s": time.perf_counter() - t0,
            "note": "part 1 refitted from the committed measured points and machine "
            "description (the measurement's command, versions and machine are above); "
            "nothing re-timed",
        }
        write_json(RESULTS, old, indent=2, default=str)
        print(markdown(old))
        print(f"\nwrote {RESULTS}")
        return
    out: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "versions": _versions(),
        "threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count(),
    }
    from joules.system import system_info

    out["machine"] = (
        system_info().to_dict() if hasattr(system_info(), "to_dict") else str(system_info())
    )
    pub = published_comparison()
    out["published"] = pub
    print(
        "\nUncalibrated 7B predictions vs published batch-1 figures (ratio = published/predicted)"
    )
    print(
        f"{'model':<11} {'hw':<16} {'technique':<14} {'phase':<8} {'published':>10} "
        f"{'predicted':>10} {'ratio':>6}"
    )
    for r in pub:
        print(
            f"{r['model']:<11} {r['hardware']:<16} {r['technique']:<14} {r['phase']:<8} "
            f"{r['published_tok_s']:>10.1f} {r['predicted_tok_s']:>10.1f} {r['ratio']:>6.2f}"
        )
    if not args.published_only:
        grid = GRID[: args.points]
        fmts = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        print(f"\nMeasuring {len(grid)} points x {fmts} of smollm2-135m on this machine...")
        t0 = time.perf_counter()
        rows, method = measure_grid(grid, args.repeats, fmts)
        out["measurement"] = {
            "method": method,
            "wall_s": time.perf_counter() - t0,
            "repeats": args.repeats,
            "model": "smollm2-135m (fp32 copy of Q4_1 weights; int8/int4: RTN of that copy)",
            "formats": list(fmts),
        }
        res = loo(rows)
        out["this_machine"] = res
        out["energy"] = (
            "not scored: energy on this machine is estimated (no RAPL, no GPU); "
            "scoring a prediction against the estimator would be circular"
        )

        def by_phase(d: dict[str, float], fmt: str = "{:.1f} %") -> str:
            return ", ".join(f"{ph} {fmt.format(d[ph])}" for ph in PHASES)

        print(
            f"\nleave-one-out MAPE over {len(rows)} points: "
            f"{by_phase(res['loo_mape_pct'])} (goal <= 15 %)"
        )
        print(f"max |error|: {by_phase(res['loo_max_abs_pct'])}")
        print(
            "uncalibrated speed of light / measured time (median): "
            + by_phase(res["sol_fraction_median"], "{:.2f}")
        )
        for f, g in res["per_format"].items():
            print(
                f"  {f}: MAPE {by_phase(g['loo_mape_pct'])}; max {by_phase(g['loo_max_abs_pct'])}; "
                f"fit {g['fit']}"
            )
        print("energy: " + out["energy"])
    elif RESULTS.is_file():  # keep the last measured part
        old = json.loads(RESULTS.read_text())
        for k in ("this_machine", "measurement", "energy"):
            if k in old:
                out[k] = old[k]
    write_json(RESULTS, out, indent=2, default=str)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
