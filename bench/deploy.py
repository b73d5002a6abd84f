"""joules' GGUF exports against llama.cpp's own quantizer, measured in llama.cpp in one run.

    python bench/deploy.py                      # rows below, 4096 WikiText-2 test tokens
    python bench/deploy.py --tokens 1024 --rows llamacpp-q4_0,rtn-q4_0

Peer: the default model exported as an F32 GGUF and quantized by llama.cpp
(``llama_model_quantize``, no imatrix). joules rows are ``joules compress`` (RTN or GPTQ with
the format ``gguf-*``; calibration: WikiText-2 valid) then ``joules export --embedding
gguf-q8_0`` (the tied embedding gets the Q8_0 that llama.cpp gives it for these types).
joules' RTN is llama.cpp's quantizer byte for byte, so its row must equal llama.cpp's: it checks
the path, it is not a result. The default model's weights were Q4_1 before we saw them.
Perplexity: llama.cpp over the first ``--tokens`` WikiText-2 **test** tokens in windows of
``--window`` (all logits of each window); decode: greedy tokens/s after a 64-token prompt.
Writes ``bench/results/deploy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "deploy.json"
ROWS = ["llamacpp-q4_0", "rtn-q4_0", "gptq-q4_0", "llamacpp-q8_0", "rtn-q8_0", "shipped-q4_1"]


def _joules(*args: str) -> None:
    cmd = [sys.executable, "-c", "from joules.cli import main; main()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"joules {' '.join(args[:2])} failed: {proc.stderr.strip()[-400:]}")


def _file(row: str, work: Path, args: argparse.Namespace) -> Path:
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import quantize_file
    from joules.models.loading import smollm2_gguf_path

    if row == "shipped-q4_1":
        return smollm2_gguf_path()
    method, qtype = row.split("-")
    out = work / f"{row}.gguf"
    if out.is_file():
        return out
    if method == "llamacpp":
        f32 = work / "f32.gguf"
        if not f32.is_file():
            export_gguf(args.model, f32)
        quantize_file(f32, out, qtype.upper(), threads=args.threads)
        return out
    d = work / row
    if not (d / "joules.json").is_file():
        _joules("compress", args.model, "-r", f"{method}(format=gguf-{qtype})", "-o", str(d))
    export_gguf(d, out, embedding="gguf-q8_0")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/joules/bench-deploy"))
    args = ap.parse_args()
    from gguf import GGUFReader

    from joules.data import load_text
    from joules.deploy.llamacpp import llamacpp_decode_speed, llamacpp_perplexity
    from joules.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = load_model(args.model).tokenizer
    text = load_text("wikitext2", "test")
    prompt = tok(text[:2000], add_special_tokens=False).input_ids[:64]
    rows: list[dict[str, Any]] = []
    print(f"{'row':16} {'MiB':>7} {'ppl':>9} {'±95%':>6} {'tok/s':>7}  types")
    for row in args.rows.split(","):
        t0 = time.perf_counter()
        path = _file(row, work, args)
        build_s = time.perf_counter() - t0
        ppl = llamacpp_perplexity(
            path, tok, text, window=args.window, limit_tokens=args.tokens, threads=args.threads
        )
        speed = llamacpp_decode_speed(path, prompt, 64, threads=args.threads)
        types: dict[str, int] = {}
        for t in GGUFReader(str(path)).tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        r = {
            "row": row,
            "file_mib": path.stat().st_size / 2**20,
            "perplexity": ppl.perplexity,
            "perplexity_ci95": list(ppl.perplexity_ci95),
            "tokens_scored": ppl.tokens_scored,
            "decode_tokens_per_s": speed.decode_tokens_per_s,
            "ttft_s": speed.ttft_s,
            "types": types,
            "build_s": build_s,
        }
        rows.append(r)
        lo, hi = r["perplexity_ci95"]
        print(
            f"{row:16} {r['file_mib']:7.1f} {r['perplexity']:9.3f} {(hi - lo) / 2:6.2f} "
            f"{r['decode_tokens_per_s']:7.1f}  {types}"
        )
    import llama_cpp

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "settings": vars(args),
                "versions": {"llama_cpp_python": llama_cpp.__version__},
                "machine": {"platform": platform.platform(), "cpu": platform.processor()},
                "note": "default model weights were Q4_1 before joules saw them; energy not "
                "measured here",
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
