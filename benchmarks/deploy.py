"""joules' GGUF exports against llama.cpp's own quantizer, measured in llama.cpp in one run.

    python benchmarks/deploy.py                   # every row below (the lead's full run)
    python benchmarks/deploy.py --tokens 256 --rows llamacpp-q4_0,rtn-q4_0 --repeats 1   # smoke
    python benchmarks/deploy.py --table           # the README table from the committed JSON

Peer: the default model exported as an F32 GGUF and quantized by llama.cpp
(``llama_model_quantize``, no imatrix) to Q4_0, Q5_0, Q8_0 and Q4_K_M. joules rows are
``joules compress`` (RTN, GPTQ, AWQ | GPTQ with the ``gguf-*`` format; calibration
``--calib-n`` × ``--calib-len`` tokens of WikiText-2 **valid**) then ``joules export --to gguf``
with the tied embedding stored in the type llama.cpp gave it in the peer file of the same type
(read from that file), so both columns of a pair share it. ``gptq-q4_k_m`` targets, tensor by
tensor, the type llama.cpp's Q4_K_M file holds (one GPTQ pass, ``overrides=[NAME=FORMAT]``).
joules' RTN is llama.cpp's quantizer byte for byte, so an ``rtn`` row must equal its peer, and
``shipped-q4_1`` is the file the default model came as (its weights were Q4_1 before joules saw
them): both check the path, they are not results.

Per row: file MiB, bits/weight (8 × tensor bytes ÷ parameters), llama.cpp perplexity over the
first ``--tokens`` WikiText-2 **test** tokens in windows of ``--window`` (all logits of each
window) with its 95 % interval and the paired per-window difference against the llama.cpp row of
the same type; then ``joules bench FILE --runtime llamacpp`` (batch 1, ``--prompt-len`` prompt
from WikiText-2 test, ``--gen-len`` tokens, ``--repeats``): decode tok/s, TTFT, J/token per
phase (this machine has no energy counter: **estimated**) and the fraction of the decode speed of
light (the file's stored tensor bytes + F16 KV ÷ probed read bandwidth). In the same run: the
transformers eager fp32 row (the issue's ≥ 5× target) and the torch path's perplexity of the
``gptq-q4_0`` directory on the same windows (the ≤ 0.5 % parity target). Built files stay in
``--work``, so a rerun resumes. Writes ``benchmarks/results/deploy.json``.
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

from common import header, write_json

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "deploy.json"
ROWS = [
    "llamacpp-q4_0",
    "rtn-q4_0",
    "gptq-q4_0",
    "awq-q4_0",
    "llamacpp-q5_0",
    "gptq-q5_0",
    "llamacpp-q8_0",
    "rtn-q8_0",
    "llamacpp-q4_k_m",
    "gptq-q4_k_m",
    "shipped-q4_1",
]
RECIPES = {
    "rtn": "rtn(format=gguf-{q})",
    "gptq": "gptq(format=gguf-{q})",
    "awq": "awq(format=gguf-{q}) | gptq(format=gguf-{q})",
}
EAGER_ROW = "eager-fp32"
PARITY_ROW = "gptq-q4_0"


def _joules(*args: str) -> None:
    cmd = [sys.executable, "-c", "from joules.cli import main; main()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"joules {' '.join(args[:2])} failed: {proc.stderr.strip()[-400:]}")


def _types(path: Path) -> dict[str, str]:
    from joules.deploy.llamacpp import gguf_tensor_table

    return {t[0]: t[1] for t in gguf_tensor_table(path)}


def _peer_file(qtype: str, work: Path, args: argparse.Namespace) -> Path:
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import quantize_file

    out = work / f"llamacpp-{qtype}.gguf"
    if not out.is_file():
        f32 = work / "f32.gguf"
        if not f32.is_file():
            export_gguf(args.model, f32)
        quantize_file(f32, out, qtype.upper(), threads=args.threads)
    return out


def q4_k_m_recipe(peer: Path) -> str:
    """A GPTQ recipe that gives every linear the type llama.cpp's Q4_K_M file holds for it."""
    from collections import Counter

    from joules.models.gguf import hf_name

    per_module = {
        hf_name(n).removesuffix(".weight"): t
        for n, t in _types(peer).items()
        if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n
    }
    default = Counter(per_module.values()).most_common(1)[0][0]
    overrides = [f'"{m}=gguf-{t.lower()}"' for m, t in sorted(per_module.items()) if t != default]
    return f"gptq(format=gguf-{default.lower()}, overrides=[{', '.join(overrides)}])"


def _file(row: str, work: Path, args: argparse.Namespace) -> tuple[Path, str | None]:
    """The row's GGUF file (built once in ``work``) and the joules recipe that made it."""
    from joules.deploy import export_gguf
    from joules.models.loading import smollm2_gguf_path

    if row == "shipped-q4_1":
        return smollm2_gguf_path(), None
    method, qtype = row.split("-", 1)
    if method == "llamacpp":
        return _peer_file(qtype, work, args), None
    peer = _peer_file(qtype, work, args)
    recipe = q4_k_m_recipe(peer) if qtype == "q4_k_m" else RECIPES[method].format(q=qtype)
    out = work / f"{row}.gguf"
    d = work / row
    if not (d / "joules.json").is_file():
        calib = ["--calib-n", str(args.calib_n), "--calib-len", str(args.calib_len)]
        _joules("compress", args.model, "-r", recipe, "-o", str(d), *calib)
    if not out.is_file():
        embd = _types(peer).get("token_embd.weight", "F32")
        export_gguf(d, out, embedding=None if embd.startswith("F") else f"gguf-{embd.lower()}")
    return out, recipe


def _bench(model: Any, tok: Any, info: Any, runtime: str, args: argparse.Namespace) -> Any:
    from joules.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        prompt_lens=(args.prompt_len,),
        gen_len=args.gen_len,
        repeats=args.repeats,
        warmup=1,
        runtime=runtime,
        threads=args.threads,
        dtype="fp32" if runtime != "llamacpp" else "auto",
    )
    return run_bench(model, tok, info, cfg)


def _speed(res: Any) -> dict[str, Any]:
    r = res.rows[0]
    de, pe = r.decode_energy, r.prefill_energy
    return {
        "decode_tok_s": r.decode_tok_s,
        "tpot_ms": 1e3 * r.tpot_s.median,
        "ttft_ms": 1e3 * r.ttft_s.median,
        "prefill_tok_s": r.prefill_tok_s,
        "decode_j_per_token": de.j_per_token if de else None,
        "prefill_j_per_token": pe.j_per_token if pe else None,
        "energy_method": de.method if de else None,
        "decode_sol_fraction": r.decode_sol_fraction,
        "decode_sol_tok_s": r.decode_sol_tok_s,
        "linear_paths": res.linear_paths,
        "bench": res.to_dict(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from joules.data import load_text
    from joules.deploy.llamacpp import gguf_tensor_table, llamacpp_perplexity
    from joules.evaluate.paired import paired_difference
    from joules.evaluate.perplexity import perplexity
    from joules.fingerprint import cache_key
    from joules.models import load_model
    from joules.models.loading import model_identity

    # files built under --work are reused only for the same model content, calibration, joules
    # code, library versions (llama.cpp's included) and compute path
    inputs = [model_identity(args.model)["sha256"], args.calib_n, args.calib_len]
    work = Path(args.work) / cache_key(inputs)
    work.mkdir(parents=True, exist_ok=True)
    base = load_model(args.model)  # fp32 (the GGUF dequantized): the eager row, tokenizer, info
    tok, info = base.tokenizer, base.info
    text = load_text("wikitext2", "test")
    ppl_kw = dict(window=args.window, limit_tokens=args.tokens, dataset="wikitext2", split="test")
    rows: list[dict[str, Any]] = []
    ppls: dict[str, Any] = {}
    print(
        f"{'row':16} {'MiB':>6} {'b/w':>5} {'ppl':>8} {'±95%':>6} {'vs peer':>8} "
        f"{'tok/s':>6} {'TTFT ms':>8} {'SoL':>5}  types",
        flush=True,
    )
    for row in args.rows.split(","):
        t0 = time.perf_counter()
        path, recipe = _file(row, work, args)
        build_s = time.perf_counter() - t0
        tensors = gguf_tensor_table(path)  # (name, type, n_elements, n_bytes, n_dims)
        n_bytes = sum(t[3] for t in tensors)
        n_params = sum(t[2] for t in tensors)
        types: dict[str, int] = {}
        for t in tensors:
            types[t[1]] = types.get(t[1], 0) + 1
        ppl = llamacpp_perplexity(path, tok, text, threads=args.threads, **ppl_kw)
        ppls[row] = ppl
        qtype = row.partition("-")[2]
        peer = f"llamacpp-{qtype}"
        paired = paired_difference(ppl, ppls[peer]) if peer in ppls and peer != row else None
        res = _bench(str(path), tok, info, "llamacpp", args)
        res.model = str(path)
        lo, hi = ppl.perplexity_ci95
        r = {
            "row": row,
            "file": path.name,
            "recipe": recipe,
            "peer": peer if paired is not None else None,
            "file_mib": path.stat().st_size / 2**20,
            "bits_per_weight": 8 * n_bytes / n_params,
            "perplexity": ppl.perplexity,
            "perplexity_ci95": [lo, hi],
            "ppl_half_ci95": (hi - lo) / 2,
            "tokens_scored": ppl.tokens_scored,
            "windows": ppl.windows,
            "vs_peer_ppl_ratio": paired.ppl_ratio if paired else None,
            "vs_peer_ppl_ratio_ci95": list(paired.ppl_ratio_ci95) if paired else None,
            "vs_peer_significant": paired.significant if paired else None,
            "paired": paired.to_dict() if paired else None,
            "types": types,
            "embedding_type": next((t[1] for t in tensors if t[0] == "token_embd.weight"), None),
            "build_s": build_s,
            "check_not_result": row.startswith("rtn-") or row == "shipped-q4_1",
            **_speed(res),
        }
        rows.append(r)
        vs = f"{r['vs_peer_ppl_ratio']:.4f}" if paired else "-"
        sol = r["decode_sol_fraction"]
        print(
            f"{row:16} {r['file_mib']:6.1f} {r['bits_per_weight']:5.2f} {r['perplexity']:8.3f} "
            f"{r['ppl_half_ci95']:6.2f} {vs:>8} {r['decode_tok_s']:6.1f} {r['ttft_ms']:8.1f} "
            f"{'-' if sol is None else f'{100 * sol:4.0f}%'}  {types}",
            flush=True,
        )
    by = {r["row"]: r for r in rows}

    # The torch path on the same windows: `joules eval DIR` of the gptq-q4_0 directory.
    parity = None
    if PARITY_ROW in by:
        lm = load_model(work / PARITY_ROW)
        torch_ppl = perplexity(lm.model, lm.tokenizer, text, batch_size=1, **ppl_kw)
        del lm
        parity = {
            "row": PARITY_ROW,
            "torch_perplexity": torch_ppl.perplexity,
            "llamacpp_perplexity": by[PARITY_ROW]["perplexity"],
            "ratio": by[PARITY_ROW]["perplexity"] / torch_ppl.perplexity,
            "tokens_scored": torch_ppl.tokens_scored,
            "same_windows": torch_ppl.windows == by[PARITY_ROW]["windows"]
            and torch_ppl.tokens_scored == by[PARITY_ROW]["tokens_scored"],
        }
        print(f"parity {PARITY_ROW}: llama.cpp / torch perplexity = {parity['ratio']:.5f}")

    # transformers eager, fp32, same prompt and length: the issue's reference row.
    eager = None
    if not args.no_eager:
        res = _bench(base.model, tok, info, "eager", args)
        eager = {"row": EAGER_ROW, **_speed(res)}
        print(f"{EAGER_ROW:16} decode {eager['decode_tok_s']:.1f} tok/s", flush=True)

    def tok_s(name: str) -> float | None:
        return by[name]["decode_tok_s"] if name in by else None

    best_q4 = min(
        (by[n] for n in ("gptq-q4_0", "awq-q4_0") if n in by),
        key=lambda r: r["perplexity"],
        default=None,
    )
    summary = {
        "joules_q4_0_row": best_q4["row"] if best_q4 else None,
        "joules_q4_0_vs_llamacpp_ppl_ratio": best_q4["vs_peer_ppl_ratio"] if best_q4 else None,
        "joules_q4_k_m_vs_llamacpp_ppl_ratio": by.get("gptq-q4_k_m", {}).get("vs_peer_ppl_ratio"),
        "joules_q4_0_vs_llamacpp_q4_0_decode": _ratio(
            tok_s(best_q4["row"]) if best_q4 else None, tok_s("llamacpp-q4_0")
        ),
        "joules_q4_0_vs_eager_fp32_decode": _ratio(
            tok_s(best_q4["row"]) if best_q4 else None,
            eager["decode_tok_s"] if eager else None,
        ),
        "torch_parity_ratio": parity["ratio"] if parity else None,
        "targets": {
            "joules_q4_0_vs_llamacpp_ppl_ratio": "< 1 (significant)",
            "joules_q4_k_m_vs_llamacpp_ppl_ratio": "< 1 (significant)",
            "joules_q4_0_vs_llamacpp_q4_0_decode": ">= 0.95",
            "joules_q4_0_vs_eager_fp32_decode": ">= 5",
            "torch_parity_ratio": "within 1 ± 0.005",
        },
    }
    print("summary:", json.dumps({k: v for k, v in summary.items() if k != "targets"}))
    return {
        **header("benchmarks/deploy.py"),
        "settings": vars(args),
        "note": "the default model's weights were Q4_1 before joules saw them; J/token is "
        "estimated (no energy counter on this machine); rtn rows and shipped-q4_1 check the path "
        "(byte-equal to llama.cpp's quantizer / the shipped file), they are not results",
        "rows": rows,
        "eager": eager,
        "parity": parity,
        "summary": summary,
        "table": table_rows({"rows": rows}),
    }


def table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The README table's rows: the row's fields, formatted-ready (one object per row)."""
    out = []
    for r in data["rows"]:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        out.append(
            {
                "row": r["row"],
                "file_mib": r["file_mib"],
                "bits_per_weight": r["bits_per_weight"],
                "perplexity": r["perplexity"],
                "ppl_half_ci95": r["ppl_half_ci95"],
                "vs_peer_ppl_ratio": r["vs_peer_ppl_ratio"],
                "decode_tok_s": r["decode_tok_s"],
                "ttft_ms": r["ttft_ms"],
                "decode_j_per_token": r["decode_j_per_token"],
                "decode_sol_pct": None
                if r["decode_sol_fraction"] is None
                else 100 * r["decode_sol_fraction"],
                "types": types,
            }
        )
    return out


MARKER = (
    "<!-- bench: results/deploy.json rows=table key=row cols=MiB=file_mib; "
    "bits/weight=bits_per_weight; perplexity=perplexity; ±95 %=ppl_half_ci95; "
    "vs llama.cpp=vs_peer_ppl_ratio; decode tok/s=decode_tok_s; TTFT ms=ttft_ms; "
    "J/token (estimated)=decode_j_per_token; SoL %=decode_sol_pct; tensor types=types -->"
)


def markdown(data: dict[str, Any]) -> str:
    """The README section's table (with its marker) and summary lines, from the JSON."""

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = (
        "| row | MiB | bits/weight | perplexity | ±95 % | vs llama.cpp | decode tok/s | TTFT ms "
        "| J/token (estimated) | SoL % | tensor types |"
    )
    lines = [MARKER, head, "|" + "---|" * 11]
    for r in data["table"]:
        lines.append(
            f"| {r['row']} | {f(r['file_mib'], '.1f')} | {f(r['bits_per_weight'], '.2f')} "
            f"| {f(r['perplexity'], '.3f')} | {f(r['ppl_half_ci95'], '.2f')} "
            f"| {f(r['vs_peer_ppl_ratio'], '.4f')} | {f(r['decode_tok_s'], '.1f')} "
            f"| {f(r['ttft_ms'], '.1f')} | {f(r['decode_j_per_token'], '.4f')} "
            f"| {f(r['decode_sol_pct'], '.0f')} | {r['types']} |"
        )
    s = data.get("summary", {})
    e = data.get("eager") or {}
    p = data.get("parity") or {}
    lines += [
        "",
        f"- {s.get('joules_q4_0_row')} vs llama.cpp Q4_0 perplexity: "
        f"{f(s.get('joules_q4_0_vs_llamacpp_ppl_ratio'), '.4f')}×; gptq-q4_k_m vs llama.cpp "
        f"Q4_K_M: {f(s.get('joules_q4_k_m_vs_llamacpp_ppl_ratio'), '.4f')}× (paired windows)",
        f"- decode: joules Q4_0 = {f(s.get('joules_q4_0_vs_llamacpp_q4_0_decode'), '.2f')}× "
        f"llama.cpp's own Q4_0 and {f(s.get('joules_q4_0_vs_eager_fp32_decode'), '.1f')}× "
        f"transformers eager fp32 ({f(e.get('decode_tok_s'), '.1f')} tok/s), same run",
        f"- torch path vs llama.cpp on the {p.get('row', PARITY_ROW)} weights: perplexity "
        f"{f(p.get('torch_perplexity'), '.3f')} vs {f(p.get('llamacpp_perplexity'), '.3f')} "
        f"(ratio {f(p.get('ratio'), '.4f')})",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-n", type=int, default=128, help="GPTQ/AWQ calibration sequences")
    ap.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-eager", action="store_true", help="skip the transformers eager row")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/joules/bench-deploy"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the README markdown of --out")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    data = run(args)
    write_json(Path(args.out), data, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
