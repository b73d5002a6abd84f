"""AWQ vs round-to-nearest on the default model's first decoder blocks: block output error on
held-out calibration tokens, chosen alphas, and the time of AWQ per block. Short (~25 s of CPU
with one thread), so it runs where the full 4-bit table (``benchmarks/compress.py``) cannot.

    python benchmarks/awq_blocks.py                 # -> benchmarks/results/awq_blocks.json
    python benchmarks/awq_blocks.py --format int4-g32 --blocks 0,1,2,3
    python benchmarks/awq_blocks.py --table              # re-derive the README rows, print

The calibration windows (WikiText-2 **valid**, ``calibration_tokens(seed=0)``) are split: the
first ``--fit`` sequences are what AWQ searches its scales and clipping on, the other
``--held`` sequences are where each block's output is compared with the fp block's, for the
block with every linear rounded to nearest (RTN), after AWQ then the same rounding, GPTQ-rounded
(Hessians from the fit sequences) and AWQ then GPTQ. Inputs to block i come from the fp blocks 0..i-1 (this isolates each block).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

from common import command, machine, parser, retable_file, write_json
from joules import formats
from joules.compress import calibration_tokens
from joules.compress.context import BlockInputs, CompressContext
from joules.compress.solvers.hessian import Hessian, gptq_quantize
from joules.compress.steps import awq
from joules.models import load_model
from joules.system import backfill_machine, system_info


def _rounded(block: nn.Module, fmt: formats.Format) -> nn.Module:
    b = copy.deepcopy(block)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(fmt.fake_quant(m.weight))
    return b


def _gptq(block: nn.Module, fit: BlockInputs, fmt: formats.Format) -> nn.Module:
    """The block with every linear GPTQ-rounded (Hessians from the fit inputs, as the gptq
    step computes them: one pass over the block before any of its linears is rounded)."""
    b = copy.deepcopy(block)
    mods = {n: m for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    hs = {n: Hessian(m.in_features) for n, m in mods.items()}
    for n, x in fit.each_input(b, mods):
        hs[n].add(x)
    with torch.no_grad():
        for n, m in mods.items():
            fitted = fmt.fit(m.weight.float())
            m.weight.copy_(gptq_quantize(m.weight, hs[n].matrix(), fitted.fake_quant_cols))
    return b


# README header -> field of a ``rows`` entry (the marker ties each column to its field)
COLUMNS = {
    "RTN": "rtn_rel_error",
    "AWQ": "awq_rel_error",
    "AWQ / RTN": "awq_over_rtn",
    "GPTQ": "gptq_rel_error",
    "AWQ + GPTQ": "awq_gptq_rel_error",
    "AWQ (no clip) + GPTQ": "awq_noclip_gptq_rel_error",
    "AWQ time": "awq_time_s",
}


def retable(data: dict) -> dict:
    """Add ``rows`` (one flat object per block, re-derived from ``blocks``, nothing re-measured)
    and, for a JSON written before it was recorded, ``machine`` (CPU flags) from this VM."""
    data["rows"] = [
        {"block": int(i), **{f: b[f] for f in COLUMNS.values()}} for i, b in data["blocks"].items()
    ]
    return backfill_machine(data)


def table(data: dict, source: str = "results/awq_blocks.json") -> str:
    """The README table (markdown) from the JSON's ``rows``."""
    lines = [
        f"<!-- bench: {source} rows=rows key=block cols="
        + "; ".join(f"{h}={f}" for h, f in COLUMNS.items())
        + " -->",
        "| block | " + " | ".join(COLUMNS) + " |",
        "|---" * (1 + len(COLUMNS)) + "|",
    ]
    for r in data["rows"]:
        cells = [f"{r[f]:.{2 if f == 'awq_over_rtn' else 4}f}" for f in list(COLUMNS.values())[:-1]]
        cells.append(f"{r['awq_time_s']:.1f} s")
        lines.append(f"| {r['block']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        __doc__,
        out=Path("benchmarks/results/awq_blocks.json"),
        model="smollm2-135m",
        threads=1,
        table=True,
    )
    ap.add_argument("--format", default="int4-g64")
    ap.add_argument("--blocks", default="0,1,2")
    ap.add_argument("--fit", type=int, default=4, help="sequences AWQ searches on")
    ap.add_argument("--held", type=int, default=4, help="held-out sequences for the error")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--grid", type=int, default=20)
    args = ap.parse_args(argv)
    if args.table:
        return retable_file(args.out, retable, table)
    torch.set_num_threads(args.threads)
    fmt = formats.get(args.format)
    model, tok, _info = load_model(args.model)
    calib, calib_info = calibration_tokens(tok, n=args.fit + args.held, length=args.length)
    ctx = CompressContext(model, tok, calib, batch_size=args.fit)
    rows: dict[int, dict] = {}

    def fn(i: int, block: nn.Module, _name: str, inputs: BlockInputs) -> None:
        fit = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])
        held = BlockInputs(inputs.hidden[1:], inputs.kwargs[1:])
        ref = torch.cat(held.run(block))
        rtn = torch.cat(held.run(_rounded(block, fmt)))
        b = copy.deepcopy(block)
        mods = {n: m for n, m in b.named_modules() if isinstance(m, nn.Linear)}
        t0 = time.perf_counter()
        recs = awq.awq_block(
            b, fit.capture(b, mods), fmt, targets=set(mods), grid=args.grid, clip=True
        )
        awq_s = time.perf_counter() - t0
        out = torch.cat(held.run(_rounded(b, fmt)))
        gptq = torch.cat(held.run(_gptq(block, fit, fmt)))
        awq_gptq = torch.cat(held.run(_gptq(b, fit, fmt)))
        b2 = copy.deepcopy(block)
        mods2 = {n: m for n, m in b2.named_modules() if isinstance(m, nn.Linear)}
        awq.awq_block(
            b2, fit.capture(b2, mods2), fmt, targets=set(mods2), grid=args.grid, clip=False
        )
        awq_noclip_gptq = torch.cat(held.run(_gptq(b2, fit, fmt)))

        def rel(y: torch.Tensor) -> float:
            return float((y - ref).norm() / ref.norm())

        rows[i] = {
            "rtn_rel_error": rel(rtn),
            "awq_rel_error": rel(out),
            "awq_over_rtn": rel(out) / rel(rtn),
            "gptq_rel_error": rel(gptq),
            "awq_gptq_rel_error": rel(awq_gptq),
            "awq_noclip_gptq_rel_error": rel(awq_noclip_gptq),
            "awq_time_s": awq_s,
            "alpha": {k: v.get("awq_alpha") for k, v in recs.items()},
            "scale_only_loss_over_rtn": {
                k: v["awq_loss"] / v["awq_rtn_loss"] for k, v in recs.items() if "awq_loss" in v
            },
            "search_tokens": next(iter(recs.values()))["awq_scale_tokens"],
        }
        r = rows[i]
        print(
            f"block {i}: RTN {r['rtn_rel_error']:.4f}  AWQ {r['awq_rel_error']:.4f}  "
            f"({r['awq_over_rtn']:.2f}x)  GPTQ {r['gptq_rel_error']:.4f}  "
            f"AWQ+GPTQ {r['awq_gptq_rel_error']:.4f}  "
            f"AWQ(no clip)+GPTQ {r['awq_noclip_gptq_rel_error']:.4f}  AWQ {awq_s:.1f} s",
            flush=True,
        )

    blocks = {int(b) for b in args.blocks.split(",")}
    ctx.sequential(fn, step="awq_blocks", blocks=blocks)
    data = {
        "command": command("benchmarks/awq_blocks.py", argv),
        "system": system_info().to_dict(),
        "machine": machine(),
        "format": args.format,
        "calibration": calib_info,
        "fit_sequences": args.fit,
        "held_sequences": args.held,
        "threads": args.threads,
        "note": "model weights were Q4_1 before joules saw them (fp32 copy of Q4_1)",
        "blocks": rows,
    }
    write_json(args.out, retable(data), indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
