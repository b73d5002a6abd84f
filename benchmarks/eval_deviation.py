"""The default model's deviation rows of the README's evaluation table, written to committed JSON.

    python benchmarks/eval_deviation.py            # bf16 vs fp32 on 8,192 tokens; mxfp4 on 4,096
    python benchmarks/eval_deviation.py --rows mxfp4 --out /tmp/dev.json

Each row is what the ``joules eval`` command beside it computes (the same task, options and
model loading): KL divergence of the model's next-token distribution from the reference's
(mean, p99), top-1 agreement, the perplexity ratio and the module with the lowest output SQNR.

* ``bf16``: the model loaded in bf16 against its fp32 copy, WikiText-2 test, 8,192 tokens;
* ``mxfp4``: the decoder's linear weights through mxfp4's emulated ``fake_quant`` against the
  fp32 model, 4,096 tokens (the weights were Q4_1 before joules saw them, so this re-quantizes).

The bf16 figures depend on the CPU's bf16 matmuls (native AVX512-BF16/AMX or emulated), hence
the machine in the JSON. Writes the command, versions, machine (CPU model and ISA flags), each
row's full result and its README cells to ``benchmarks/results/eval_deviation.json``. Quality only:
the durations inside the results are incidental.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from common import header, parser, write_json
from joules.evaluate import tasks
from joules.models import load_model

MODEL = "smollm2-135m"
ROWS = {
    "bf16": {
        "what": "deviation, bf16 vs fp32, 8,192 tokens",
        "dtype": torch.bfloat16,
        "options": {"limit_tokens": 8192},
        "cli": f"joules eval {MODEL} --task deviation --dtype bf16 --limit-tokens 8192",
    },
    "mxfp4": {
        "what": "deviation, weights in mxfp4 (emulated), 4,096 tokens",
        "dtype": torch.float32,
        "options": {"limit_tokens": 4096, "weights_format": "mxfp4"},
        "cli": f"joules eval {MODEL} --task deviation --weights-format mxfp4 --limit-tokens 4096",
    },
}


def run_row(name: str) -> dict:
    spec = ROWS[name]
    model, tok, info = load_model(MODEL, dtype=spec["dtype"])
    result = tasks.run_task("deviation", model, tok, info, **spec["options"])
    worst = result.worst_layers(1)[0]
    return {
        "row": name,
        "what": spec["what"],
        "command": spec["cli"],
        "kl_mean": result.kl_mean,
        "kl_p99": result.kl_p99,
        "top1_pct": 100 * result.top1_agreement,
        "perplexity_model": result.perplexity_model,
        "perplexity_reference": result.perplexity_reference,
        "perplexity_ratio": result.perplexity_ratio,
        "worst_layer": worst.name,
        "worst_layer_sqnr_db": worst.sqnr_db,
        "result": result.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=Path("benchmarks/results/eval_deviation.json"), threads=2)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = header("benchmarks/eval_deviation.py", argv)
    rows = [run_row(r.strip()) for r in args.rows.split(",") if r.strip()]
    for r in rows:
        print(
            f"{r['what']}: KL mean {r['kl_mean']:.5f}, p99 {r['kl_p99']:.4f}; top-1 "
            f"{r['top1_pct']:.2f} %; ppl {r['perplexity_model']:.2f} vs "
            f"{r['perplexity_reference']:.2f} (x{r['perplexity_ratio']:.4f}); worst "
            f"{r['worst_layer']} ({r['worst_layer_sqnr_db']:.1f} dB)"
        )
    data = {
        **head,
        "model": MODEL,
        "note": "weights Q4_1 before joules saw them; the fp32 reference is an fp32 copy of them",
        "rows": rows,
    }
    write_json(args.out, data, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
