"""joules' KL divergence against ``llama-perplexity --kl-divergence`` on the same files and text.

    python benchmarks/peers/llamacpp/check_kld.py                  # 8 chunks of 512 (default)
    python benchmarks/peers/llamacpp/check_kld.py --chunks 32      # the issue's 16,384 tokens

The default model exported as an F32 GGUF (the reference) and quantized by llama.cpp to Q4_0
(``llama_model_quantize``, no imatrix); its weights were Q4_1 before joules saw them, so the F32
file is the Q4_1 grid decoded, and Q4_0 is a requantization of it. Text: the first
``--chunks × --ctx`` tokens' worth of the shipped WikiText-2 **test** split, written to a file
cut at a line end (llama-perplexity reads ``-f`` whole and drops one trailing newline; that file
has none). Both sides score llama-perplexity's protocol: chunks of ``--ctx`` tokens, BOS per
chunk only where the GGUF says ``add_bos_token`` (SmolLM2's does not), the second half scored.

* **llama.cpp**: the binaries built by ``build.sh`` (paths in ``/work/notes/llamacpp_tools.txt``
  or ``build/bin``): ``llama-perplexity -m f32.gguf -f text --kl-divergence-base base.kld``,
  then ``-m q4_0.gguf --kl-divergence-base base.kld --kl-divergence``; its printed figures.
  With ``-nr`` (no weight repacking) where joules keeps llama.cpp's plain CPU buffers (AMX
  CPUs, see :func:`joules.deploy.llamacpp.extra_buffers_safe`).
* **joules**: ``scored="second-half"`` through :class:`joules.deploy.llamacpp_logits.LlamaCppLogits`
  (llama-cpp-python, the same vendored llama.cpp) on the same files; the text tokenized by
  joules' tokenizer of the F32 file, checked token for token against the tokens llama-perplexity
  wrote into its base file. Also: joules' KL computed against llama-perplexity's own base file
  with llama.cpp's formula (no storage correction), and the stored uint16 log-probs of both
  compared step for step.

Agreement: each joules figure within llama-perplexity's printed ``±`` of llama's (mean KLD,
PPL ratio, same top p); median, p99 and max have no printed uncertainty (their differences are
reported). Writes ``benchmarks/peers/llamacpp/check_kld.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from joules.serialize import atomic_write_bytes

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent.parent
sys.path.insert(0, str(BENCH))  # benchmarks/common.py (this script lives two folders down)
from common import header, write_json  # noqa: E402

OUT = HERE / "check_kld.json"


def tool(name: str) -> Path:
    """The built ``name`` binary (``make peers-llamacpp`` puts it in build/bin)."""
    p = HERE / "build" / "bin" / name
    if not p.is_file():
        sys.exit(f"{name} not found: build it with benchmarks/peers/llamacpp/build.sh")
    return p


def files(work: Path, model: str, threads: int) -> tuple[Path, Path]:
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import quantize_file

    f32, q4 = work / "f32.gguf", work / "q4_0.gguf"
    if not f32.is_file():
        export_gguf(model, f32)
    if not q4.is_file():
        quantize_file(f32, q4, "Q4_0", threads=threads)
    return f32, q4


def text_file(work: Path, f32: Path, tokens: int) -> tuple[Path, str]:
    """A WikiText-2 test prefix that llama.cpp tokenizes to at least ``tokens`` + 64 tokens,
    cut at a line end, written without a trailing newline (bytes as joules reads them)."""
    from joules.data import load_text
    from joules.deploy.llamacpp import load_llama

    full = load_text("wikitext2", "test")
    llm = load_llama(f32, n_ctx=64, threads=1)
    chars = 6 * tokens
    while True:
        cut = full.rfind("\n", 0, chars)
        text = full[:cut].rstrip("\n")
        n = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        if n >= tokens + 64 or chars >= len(full):
            break
        chars *= 2
    path = work / f"wikitext2-test-{tokens}.txt"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path, text


FIGURES = {
    "ppl_q": r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*(-?[\d.]+)\s*±\s*([\d.]+)",
    "kl_mean": r"Mean    KLD:\s*(-?[\d.]+)\s*±\s*([\d.]+)",
    "kl_max": r"Maximum KLD:\s*(-?[\d.]+)()",
    "kl_p99": r"99\.0%   KLD:\s*(-?[\d.]+)()",
    "kl_median": r"Median  KLD:\s*(-?[\d.]+)()",
    "same_top_pct": r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)",
}


def parse(out: str) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for k, pat in FIGURES.items():
        m = re.search(pat, out)
        if m:
            got[k] = float(m.group(1))
            if m.group(2):
                got[k + "_pm"] = float(m.group(2))
    return got


def run_tool(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {proc.returncode}: {out[-1500:]}")
    return out, time.perf_counter() - t0


def read_base(path: Path) -> dict[str, Any]:
    """llama-perplexity's ``--kl-divergence-base`` file: ``_logits_``, n_ctx, n_vocab, n_chunk,
    the tokens, then per chunk ``n_ctx - 1 - n_ctx/2`` rows of ``[scale, min]`` float32 and
    ``n_vocab`` (rounded up to even) uint16 steps."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_", "not a llama.cpp log-prob file"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, np.int32, 3, 8).tolist()
    tokens = np.frombuffer(raw, np.int32, n_ctx * n_chunk, 20)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw, np.uint16, offset=20 + 4 * tokens.size).reshape(-1, nv)
    head = rows[:, :4].copy().view(np.float32)  # [scale, min] per row
    return {
        "n_ctx": n_ctx,
        "n_vocab": n_vocab,
        "n_chunk": n_chunk,
        "tokens": tokens,
        "steps": rows[:, 4 : 4 + n_vocab],
        "scale": head[:, 0].copy(),
        "low": head[:, 1].copy(),
    }


def llamacpp_formula_kl(q4: Path, base: dict[str, Any], threads: int) -> dict[str, float]:
    """joules' llama.cpp logits of ``q4`` against llama-perplexity's own stored base, with
    llama.cpp's sum (no storage correction): the two tools' arithmetic, the store held fixed."""
    import torch

    from joules.deploy.llamacpp_logits import LlamaCppLogits
    from joules.evaluate.kld import stored_kl_terms

    n_ctx = base["n_ctx"]
    first = n_ctx // 2
    src = LlamaCppLogits(q4, n_ctx=n_ctx, threads=threads)
    kls, agree, pos = [], 0, 0
    for c in range(base["n_chunk"]):
        row = base["tokens"][c * n_ctx : (c + 1) * n_ctx].tolist()
        lp = src.logprobs(row, first=first)[:-1]
        n = lp.shape[0]
        sl = slice(pos, pos + n)
        kls.append(stored_kl_terms(base["steps"][sl], base["scale"][sl], base["low"][sl], lp))
        dec = torch.from_numpy(base["steps"][sl].astype(np.float32))
        agree += int((lp.argmax(-1) == dec.argmax(-1)).sum())
        pos += n
    kl = torch.cat(kls).numpy()
    return {
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "same_top_pct": 100.0 * agree / kl.size,
        "tokens": int(kl.size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/joules/check-kld"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from joules.deploy.llamacpp import extra_buffers_safe
    from joules.deploy.llamacpp_logits import LlamaCppLogits
    from joules.evaluate.kld import TokenProtocol, kl_divergence, protocol_ids, reference_logprobs
    from joules.models import load_model

    f32, q4 = files(work, args.model, args.threads)
    n_tokens = args.chunks * args.ctx
    txt, text = text_file(work, f32, n_tokens)

    # -- llama.cpp's own tool
    perplexity = tool("llama-perplexity")
    common = ["-c", str(args.ctx), "-t", str(args.threads), "-b", str(args.ctx)]
    repack = [] if extra_buffers_safe() else ["-nr"]
    base_file = work / f"base-{args.chunks}x{args.ctx}.kld"
    base_cmd = [str(perplexity), "-m", str(f32), "-f", str(txt), "--chunks", str(args.chunks),
                "--kl-divergence-base", str(base_file), *common, *repack]  # fmt: skip
    _, base_s = run_tool(base_cmd)
    kld_cmd = [str(perplexity), "-m", str(q4), "--kl-divergence-base", str(base_file),
               "--kl-divergence", *common, *repack]  # fmt: skip
    kld_out, kld_s = run_tool(kld_cmd)
    llama = parse(kld_out)
    base = read_base(base_file)

    # -- joules, through llama-cpp-python on the same files
    tok = load_model(str(f32)).tokenizer
    protocol = TokenProtocol(
        window=args.ctx, scored="second-half", limit_tokens=n_tokens, dataset=txt.name
    )
    ids, resolved, _ = protocol_ids(tok, text, protocol)
    llama_tokens = base["tokens"].tolist()
    stream = ([tok.bos_token_id] if resolved.add_bos else []) + ids
    same_tokens = stream[: len(llama_tokens)] == llama_tokens
    mismatch = next(
        (i for i, (a, b) in enumerate(zip(stream, llama_tokens, strict=False)) if a != b), None
    )
    t0 = time.perf_counter()
    ref = reference_logprobs(LlamaCppLogits(f32, n_ctx=args.ctx, threads=args.threads), tok,
                             text, protocol)  # fmt: skip
    r = kl_divergence(LlamaCppLogits(q4, n_ctx=args.ctx, threads=args.threads), ref)
    joules_s = time.perf_counter() - t0
    steps_equal = float((np.asarray(ref.steps) == base["steps"]).mean())
    steps_maxdiff = int(np.abs(np.asarray(ref.steps, np.int32) - base["steps"]).max())
    formula = llamacpp_formula_kl(q4, base, args.threads)

    ours = {
        "kl_mean": r.kl_mean,
        "kl_lo": r.kl_lo,
        "kl_hi": r.kl_hi,
        "kl_median": r.kl_median,
        "kl_p99": r.kl_p99,
        "kl_max": r.kl_max,
        "same_top_pct": 100 * r.top1_agreement,
        "ppl_q": r.perplexity_model,
        "ppl_base": r.perplexity_reference,
        "ppl_ratio": r.perplexity_ratio,
        "ppl_ratio_lo": r.ppl_ratio_lo,
        "ppl_ratio_hi": r.ppl_ratio_hi,
        "tokens_scored": r.tokens_scored,
        "windows": r.windows,
    }
    agree = {}
    for k in ("kl_mean", "ppl_ratio", "same_top_pct", "ppl_q", "ppl_base"):
        diff = ours[k] - llama[k]
        agree[k] = {
            "joules": ours[k],
            "llama": llama[k],
            "llama_pm": llama.get(k + "_pm"),
            "diff": diff,
            "within_printed_uncertainty": abs(diff) <= llama.get(k + "_pm", 0.0),
        }
    for k in ("kl_median", "kl_p99", "kl_max"):
        agree[k] = {"joules": ours[k], "llama": llama[k], "diff": ours[k] - llama[k]}
    data = {
        **header("benchmarks/peers/llamacpp/check_kld.py"),
        "note": (
            "default model smollm2-135m (its weights were Q4_1 before joules saw them): F32 "
            "export as the reference, llama.cpp Q4_0 (no imatrix) as the model"
        ),
        "files": {p.name: p.stat().st_size for p in (f32, q4)},
        "text": {
            "file": txt.name,
            "bytes": txt.stat().st_size,
            "chunks": args.chunks,
            "ctx": args.ctx,
        },
        "tokenization": {
            "llama_tokens": len(llama_tokens),
            "joules_equal_llama": same_tokens,
            "first_mismatch": mismatch,
            "add_bos": bool(resolved.add_bos),
        },
        "llama_perplexity": {
            "commands": [" ".join(base_cmd), " ".join(kld_cmd)],
            "repack": not repack,
            "figures": llama,
            "seconds": {"base": base_s, "kld": kld_s},
            "uncertainty": "llama.cpp's ± is the per-token standard error sqrt(var/(n-1))",
        },
        "joules": {
            "figures": ours,
            "seconds": joules_s,
            "runtime": r.protocol.compute_path,
            "reference_store": r.protocol.reference_store,
            "bytes_per_token": ref.bytes_per_token,
            "interval": r.protocol.interval,
        },
        "store_vs_llama_base": {
            "steps_equal_fraction": steps_equal,
            "steps_max_abs_diff": steps_maxdiff,
        },
        "joules_logits_on_llama_base_llamacpp_formula": formula,
        "agreement": agree,
        "all_within_printed_uncertainty": all(
            v.get("within_printed_uncertainty", True) for v in agree.values()
        ),
    }
    write_json(Path(args.out), data, indent=1, default=str)
    for k, v in agree.items():
        pm = f" ± {v['llama_pm']:.6f}" if v.get("llama_pm") is not None else ""
        print(
            f"{k:14s} joules {v['joules']:.6f}  llama {v['llama']:.6f}{pm}  diff {v['diff']:+.2e}"
        )
    print(f"tokens identical: {same_tokens}; stored steps equal: {100 * steps_equal:.3f} %")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
