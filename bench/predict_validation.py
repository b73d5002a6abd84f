"""Validate ``joules predict``: leave-one-out error on this machine, and 7B models on GPUs.

    flock /tmp/joules-heavy.lock python bench/predict_validation.py            # full run
    python bench/predict_validation.py --published-only                        # GPU part only

Part 1 (this machine). The default model (SmolLM2-135M, fp32 — an fp32 copy of weights that were
Q4_1 before joules saw them) is measured over a grid of (prompt length, generated length, batch)
points: time to first token (prefill) and mean time per decode step (TPOT). For each point the
predictor is calibrated on the *other* points and predicts the held-out one (leave-one-out); the
script prints the mean absolute percentage error (MAPE) per phase, and the error of the
uncalibrated speed of light for reference. Measurements come from ``joules.bench.run_bench``
(eager transformers) when that module is installed; otherwise from the fallback timer below (one
prefill forward, then one forward per generated token with the KV cache, greedy), which times
the same phases.

Energy: this VM has neither RAPL nor a GPU, so energy is *estimated* (CPU time x watts from the
hardware table). Fitting the energy model to the estimator and scoring it against the same
estimator would be circular, so no energy error is printed: it is reported only against a real
meter (RAPL or NVML).

Part 2 (uncalibrated GPUs). Llama-2-7B and Llama-3-8B shapes (``joules/data/configs``) are
predicted on the catalogued A100, H100 and RTX 4090 and compared with published batch-1 figures,
each cited in ``PUBLISHED`` below; the ratio is published / predicted (< 1: the real system
reaches that fraction of the speed of light).

Writes ``bench/results/predict_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

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


def _measure_fallback(model: Any, ids: Any, gen_len: int, repeats: int) -> tuple[float, float]:
    """(median TTFT s, median TPOT s): one prefill forward, then one forward per token."""
    import torch

    ttfts, tpots = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(gen_len - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            ttfts.append(t1 - t0)
            tpots.append((t2 - t1) / max(gen_len - 1, 1))
    return statistics.median(ttfts), statistics.median(tpots)


def measure_grid(grid: list[tuple[int, int, int]], repeats: int) -> tuple[list[dict], str]:
    import torch

    from joules.data import load_text
    from joules.models import load_model

    model, tok, info = load_model("smollm2-135m")
    try:
        from joules.bench.config import BenchConfig  # type: ignore[import-not-found]
        from joules.bench.runner import run_bench  # type: ignore[import-not-found]
    except ImportError:
        run_bench = None
    text = load_text("wikitext2", "test")
    stream = tok(text[:200_000], return_tensors="pt").input_ids[0]
    rows = []
    if run_bench is not None:
        method = "joules.bench.run_bench (eager)"
        for p, g, b in grid:
            res = run_bench(
                model,
                tok,
                info,
                BenchConfig(prompt_lens=(p,), gen_len=g, batch_sizes=(b,), repeats=repeats),
            )
            r = res.to_dict()["rows"][0]
            rows.append(
                {
                    "prompt_len": p,
                    "gen_len": g,
                    "batch": b,
                    "ttft_s": r["ttft_s"]["median"],
                    "tpot_s": r["tpot_s"]["median"],
                }
            )
            print(
                f"  p={p:5d} g={g:4d} b={b}: TTFT {rows[-1]['ttft_s']:.3f} s, "
                f"TPOT {rows[-1]['tpot_s'] * 1e3:.1f} ms",
                flush=True,
            )
        return rows, method
    method = "fallback timer of this script (joules.bench not installed): eager forwards"
    _measure_fallback(model, stream[:32].unsqueeze(0), 4, 1)  # warm-up
    for i, (p, g, b) in enumerate(grid):
        ids = torch.stack([stream[(i * 7 + j) * 97 : (i * 7 + j) * 97 + p] for j in range(b)])
        ttft, tpot = _measure_fallback(model, ids, g, repeats)
        rows.append({"prompt_len": p, "gen_len": g, "batch": b, "ttft_s": ttft, "tpot_s": tpot})
        print(f"  p={p:5d} g={g:4d} b={b}: TTFT {ttft:.3f} s, TPOT {tpot * 1e3:.1f} ms", flush=True)
    return rows, method


def loo(rows: list[dict]) -> dict[str, Any]:
    from joules.predict import ModelShape, Workload, predict
    from joules.predict.calibrate import Observation, fit
    from joules.predict.catalog import this_machine
    from joules.predict.roofline import Coefficients

    shape, _ = ModelShape.load("smollm2-135m")
    hw = this_machine()
    obs = [
        Observation(
            shape,
            Workload(r["prompt_len"], r["gen_len"], r["batch"]),
            "fp32",
            r["ttft_s"],
            r["tpot_s"],
            label=str(i),
        )
        for i, r in enumerate(rows)
    ]
    uncal = Coefficients.uncalibrated(hw)
    points = []
    for i, o in enumerate(obs):
        cal = fit(obs[:i] + obs[i + 1 :], hw)
        p = predict(shape, hw, o.workload, weight_format="fp32", coefficients=cal.coefficients)
        u = predict(shape, hw, o.workload, weight_format="fp32", coefficients=uncal)
        point = dict(rows[i])
        point |= {f"pred_{key}": getattr(p, attr) for key, attr in PHASES.values()}
        point |= {f"err_{ph}": getattr(p, a) / getattr(o, a) - 1 for ph, (_, a) in PHASES.items()}
        point |= {f"sol_{key}": getattr(u, attr) for key, attr in PHASES.values()}
        point |= {f"{ph}_bound": p.bound(ph) for ph in PHASES}
        points.append(point)
    full = fit(obs, hw)

    def per_phase(f: Any) -> dict[str, float]:
        return {ph: f(ph, key) for ph, (key, _) in PHASES.items()}

    return {
        "hardware": hw.to_dict(),
        "points": points,
        "loo_mape_pct": per_phase(
            lambda ph, _: 100 * statistics.fmean(abs(x[f"err_{ph}"]) for x in points)
        ),
        "loo_max_abs_pct": per_phase(lambda ph, _: 100 * max(abs(x[f"err_{ph}"]) for x in points)),
        "sol_fraction_median": per_phase(
            lambda _, key: statistics.median(x[f"sol_{key}"] / x[key] for x in points)
        ),
        "fit_all_points": full.coefficients.to_dict(),
    }


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
        m, mx = tm["loo_mape_pct"], tm["loo_max_abs_pct"]
        lines += [
            "",
            "| phase | points | leave-one-out MAPE | max abs. error | uncalibrated SoL / measured |",
            "|---|---|---|---|---|",
        ]
        for ph in PHASES:
            lines.append(
                f"| {ph} | {len(tm['points'])} | {m[ph]:.1f} % | {mx[ph]:.1f} % "
                f"| {tm['sol_fraction_median'][ph]:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--published-only", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the README tables from the JSON")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--points", type=int, default=len(GRID), help="first N grid points")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
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
        print(f"\nMeasuring {len(grid)} points of smollm2-135m (fp32) on this machine...")
        t0 = time.perf_counter()
        rows, method = measure_grid(grid, args.repeats)
        out["measurement"] = {
            "method": method,
            "wall_s": time.perf_counter() - t0,
            "repeats": args.repeats,
            "model": "smollm2-135m (fp32 copy of Q4_1 weights)",
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
        print("energy: " + out["energy"])
    elif RESULTS.is_file():  # keep the last measured part
        old = json.loads(RESULTS.read_text())
        for k in ("this_machine", "measurement", "energy"):
            if k in old:
                out[k] = old[k]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
