"""Perplexity throughput of joules (fp32, bf16) against llama.cpp on the same tokens.

    $ python benchmarks/eval_speed.py                  # 4,096 WikiText-2 test tokens, window 1024
    $ python benchmarks/eval_speed.py --tokens 8192 --window 512 --out benchmarks/results/x.json

The results JSON records the command, package versions, the CPU model and its ISA flags: bf16
is fast only on CPUs with native bf16 (AVX512-BF16, AMX, ARM BF16), so a bf16 figure means
nothing without the machine. It also records what ``--dtype auto``
(:mod:`joules.runtime_dtype`) picks on this machine, from a fresh probe, beside the measured
rows, so the two can be checked against each other.

Each runtime scores the same non-overlapping windows of the same token ids (no BOS, the first
token of each window is context only) and reports perplexity and tokens/s; the speed ratio is
joules / llama.cpp measured in this run, against llama.cpp's whole loop (eval, logits copy,
log-softmax in numpy) and against its ``eval()`` calls alone (the stricter peer). llama.cpp runs the default model's GGUF file as shipped
(Q4_1 weights, its own quantized kernels) through llama-cpp-python (optional:
``pip install 'joules[llamacpp]'``); joules runs the same weights dequantized to fp32, or
rounded to bf16. Warm-up: one window per runtime before the timed phase. Threads: all cores for
both.
"""

from __future__ import annotations

import math
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from common import command, machine, parser, write_json
from joules.data import load_text
from joules.evaluate.perplexity import perplexity, plan_windows, tokenize_stream
from joules.evaluate.scoring import set_threads
from joules.models import load_model, smollm2_gguf_path
from joules.runtime_dtype import auto_dtype


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def bench_joules(dtype: torch.dtype, ids: list[int], window: int, batch: int | None) -> dict:
    model, tok, _ = load_model("smollm2-135m", dtype=dtype)
    perplexity(model, tok, ids[: window + 1], window=window, batch_size=1)  # warm-up
    r = perplexity(model, tok, ids, window=window, batch_size=batch)
    return {
        "runtime": f"joules {str(dtype).removeprefix('torch.')}",
        "perplexity": r.perplexity,
        "tokens_scored": r.tokens_scored,
        "duration_s": r.duration_s,
        "tokens_per_s": r.tokens_per_s,
        "batch_size": r.protocol.batch_size,
    }


def bench_llama_cpp(ids: list[int], window: int, threads: int) -> dict:
    from llama_cpp import Llama

    from joules.deploy.llamacpp import extra_buffers_safe, llama_model_params

    with llama_model_params(use_extra_bufts=extra_buffers_safe()):
        llm = Llama(
            model_path=str(smollm2_gguf_path()),
            n_ctx=window,
            n_batch=window,
            n_ubatch=window,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    windows = plan_windows(len(ids), window, window, add_bos=False)

    def run(ws) -> tuple[float, int, float]:
        nll, n, eval_s = 0.0, 0, 0.0
        for w in ws:
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[w.begin : w.end])
            eval_s += time.perf_counter() - t
            logits = np.asarray(llm.scores[: w.end - w.begin], dtype=np.float32)  # [T, V]
            lo = w.score_from - w.begin
            rows = logits[lo - 1 : -1]  # positions predicting tokens lo..T-1
            mx = rows.max(-1, keepdims=True)
            lse = (mx[:, 0] + np.log(np.exp(rows - mx).sum(-1))).astype(np.float64)
            tgt = np.asarray(ids[w.score_from : w.end])
            nll += float((lse - rows[np.arange(len(tgt)), tgt]).sum())
            n += len(tgt)
        return nll, n, eval_s

    run(windows[:1])  # warm-up
    t0 = time.perf_counter()
    nll, n, eval_s = run(windows)
    dur = time.perf_counter() - t0
    return {
        "runtime": "llama.cpp (GGUF Q4_1)",
        "perplexity": math.exp(nll / n),
        "tokens_scored": n,
        "duration_s": dur,
        "tokens_per_s": n / dur,
        # llm.eval alone (forward + logits copy), without the NLL arithmetic in numpy
        "eval_only_tokens_per_s": n / eval_s,
        "batch_size": 1,
    }


def main() -> None:
    ap = parser(
        __doc__,
        out=Path("benchmarks/results/eval_speed.json"),
        tokens=4096,
        window=1024,
        threads=None,
    )
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    _, tok, _ = load_model("smollm2-135m")
    ids = tokenize_stream(tok, load_text("wikitext2", "test"), args.tokens)

    rows = []
    try:
        rows.append(bench_llama_cpp(ids, args.window, threads))
    except ImportError:
        rows.append({"runtime": "llama.cpp", "error": "llama-cpp-python is not installed"})
    rows.append(bench_joules(torch.float32, ids, args.window, args.batch_size))
    rows.append(bench_joules(torch.bfloat16, ids, args.window, args.batch_size))
    auto = auto_dtype(refresh=True)  # a fresh probe, in the same run as the rows above
    peer = rows[0].get("tokens_per_s")
    peer_eval = rows[0].get("eval_only_tokens_per_s")
    for r in rows:
        ok = "tokens_per_s" in r
        r["speed_vs_llama_cpp"] = r["tokens_per_s"] / peer if peer and ok else None
        r["speed_vs_llama_cpp_eval_only"] = (
            r["tokens_per_s"] / peer_eval if peer_eval and ok else None
        )

    print(
        f"perplexity throughput, WikiText-2 test first {len(ids):,} tokens, window {args.window}, "
        f"{threads} threads, cpu {os.cpu_count()} logical cores"
    )
    print(
        f"{'runtime':<24}{'ppl':>10}{'tokens':>9}{'s':>9}{'tok/s':>9}{'x llama.cpp':>13}"
        f"{'x its eval()':>14}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['runtime']:<24}  {r['error']}")
            continue
        ratio, ratio_eval = r["speed_vs_llama_cpp"], r["speed_vs_llama_cpp_eval_only"]
        print(
            f"{r['runtime']:<24}{r['perplexity']:>10.4f}{r['tokens_scored']:>9,}"
            f"{r['duration_s']:>9.1f}{r['tokens_per_s']:>9.1f}"
            f"{(f'{ratio:.2f}' if ratio else '-'):>13}"
            f"{(f'{ratio_eval:.2f}' if ratio_eval else '-'):>14}"
        )
    if "eval_only_tokens_per_s" in rows[0]:
        print(f"llama.cpp eval() alone: {rows[0]['eval_only_tokens_per_s']:.1f} tok/s")
    info = machine()
    print(f"cpu: {info.get('cpu_model')}; flags: {', '.join(info.get('cpu_flags', []))}")
    print(f"--dtype auto picks {auto.name} here ({auto.reason})")
    write_json(
        args.out,
        {
            "command": command("benchmarks/eval_speed.py"),
            "model": "smollm2-135m (SmolLM2-135M-Instruct; weights Q4_1 in its GGUF file)",
            "tokens": len(ids),
            "window": args.window,
            "threads": threads,
            "versions": {p: _version(p) for p in ("torch", "transformers", "llama_cpp_python")},
            "machine": info,
            "dtype_auto": auto.to_dict(),
            "rows": rows,
        },
        indent=2,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
