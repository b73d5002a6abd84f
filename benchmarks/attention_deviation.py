"""Attention deviation from fp64 at bf16: the README's table, written to committed JSON.

    python benchmarks/attention_deviation.py       # seq 128, 512, 1024, 4096; bf16 and fp32
    python benchmarks/attention_deviation.py --seq-lens 128,256 --out /tmp/attn.json

The same computation as ``joules eval --task attention-deviation`` (4 heads x 64, causal,
seed 1234, Q/K/V ~ N(0, 1) rounded to the dtype, fp64 standard attention on the rounded inputs as
the reference), restricted to the lengths and the block size the README shows. No model and no
timing: the figures depend only on the arithmetic (which can differ between CPUs whose bf16
matmuls accumulate differently, hence the machine in the JSON).

Writes the command, versions, machine (CPU model and ISA flags), every row of the library's
result, the bf16 flash-style / standard ratios, and ``readme_rows`` (one per sequence length,
"max / mean" per implementation as the README prints them: tests/test_readme_tables.py checks
the README against them and them against the raw rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import header, parser, write_json
from joules.evaluate import tasks

# README column -> (impl, block size or None); the block size is the run's one flash block.
COLUMNS = {
    "standard": ("standard", None),
    "sdpa-math": ("sdpa-math", None),
    "sdpa-flash": ("sdpa-flash", None),
    "flash-style, block {bs}": ("flash-style", "bs"),
    "flash-style, bf16 running state": ("flash-style-lowacc", "bs"),
}


def cell(max_abs_dev: float, mean_abs_dev: float) -> str:
    """A README cell: max / mean |deviation|, two significant digits each."""
    return f"{max_abs_dev:.1e} / {mean_abs_dev:.1e}"


def readme_rows(rows: list[dict], dtype: str, block_size: int) -> list[dict]:
    """One row per sequence length at ``dtype``: the README's cells, from the library's rows."""
    out = []
    for s in sorted({r["seq_len"] for r in rows}):
        row: dict[str, object] = {"seq_len": s}
        for col, (impl, bs) in COLUMNS.items():
            want_bs = block_size if bs else None
            match = [
                r
                for r in rows
                if r["impl"] == impl
                and r["dtype"] == dtype
                and r["seq_len"] == s
                and r["block_size"] == want_bs
            ]
            name = col.format(bs=block_size)
            row[name] = cell(match[0]["max_abs_dev"], match[0]["mean_abs_dev"]) if match else None
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=Path("benchmarks/results/attention_deviation.json"))
    ap.add_argument("--seq-lens", default="128,512,1024,4096")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    task = tasks.get(
        "attention-deviation",
        seq_lens=[int(s) for s in args.seq_lens.split(",")],
        dtypes=[d.strip() for d in args.dtypes.split(",")],
        block_sizes=[args.block_size],
        heads=args.heads,
        seed=args.seed,
    )
    result = task.run().to_dict()
    table = readme_rows(result["rows"], "bf16", args.block_size)
    data = {
        **header("benchmarks/attention_deviation.py", argv),
        "note": (
            "deterministic arithmetic on seeded synthetic inputs (no model); duration_s of each"
            " row is incidental, not a benchmark"
        ),
        "readme_dtype": "bf16",
        "block_size": args.block_size,
        **result,
        "readme_rows": table,
    }
    for r in table:
        print(" | ".join(str(v) for v in r.values()))
    for key in ("ratios_bf16", "ratios_bf16_lowacc"):
        print(key, [round(r["mean_ratio"], 2) for r in result[key]])
    write_json(args.out, data, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
