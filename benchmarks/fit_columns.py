"""Cost of GPTQ's column loop through ``Format.fit``: one column's ``fake_quant_cols`` at 1536 rows.

    python benchmarks/fit_columns.py                              # the default formats, 1 thread
    python benchmarks/fit_columns.py --formats int4-g64,mxfp4 --rows 576 --cols 1536 --out /tmp/f.json

GPTQ calls ``fitted.fake_quant_cols(W[:, c:c+1], c)`` once per column (576 to 1536 columns per
layer, 210 layers in the default model), so that call must cost little next to the column's own
GPTQ arithmetic. For each format: the time to ``fit`` a [rows, cols] fp32 weight, the median time
of one single-column call over every column (after one burn-in pass), and as peers measured in this
run: the whole-weight ``fmt.fake_quant`` divided by the number of columns (the amortized cost of
rounding one column when it is done in one batch) and GPTQ's rank-1 error update of one column
inside a 128-column block (``W[:, c+1:end].addr_(err, Hinv[c, c+1:end])``, the work the loop does
anyway). Threads: 1 by default (a shared machine); read ratios, not absolutes.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from common import header, parser, write_json
from joules import formats

DEFAULT = "int4-g64,uint4-asym-g64,int8-ch,fp8-e4m3,nf4,mxfp4,nxfp4,ternary-g64,codebook4"


def _time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn``."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_format(spec: str, w: torch.Tensor) -> dict:
    fmt = formats.get(spec)
    cols = w.shape[1]
    t0 = time.perf_counter()
    f = fmt.fit(w)
    fit_s = time.perf_counter() - t0
    columns = [w[:, c : c + 1].clone() for c in range(cols)]
    for c in range(cols):  # burn-in
        f.fake_quant_cols(columns[c], c)
    per_col = []
    for c in range(cols):
        t0 = time.perf_counter()
        f.fake_quant_cols(columns[c], c)
        per_col.append(time.perf_counter() - t0)
    col_s = statistics.median(per_col)
    whole_s = _time(lambda: fmt.fake_quant(w), 3)
    return {
        "format": spec,
        "fit_s": fit_s,
        "fit_ms": fit_s * 1e3,
        "column_us": col_s * 1e6,
        "whole_fake_quant_per_column_us": whole_s / cols * 1e6,
        "column_vs_amortized": col_s / (whole_s / cols),
    }


def bench_rank1(w: torch.Tensor, block: int = 128) -> float:
    """Median µs of GPTQ's per-column error update inside a block of ``block`` columns."""
    rows = w.shape[0]
    work = w[:, :block].clone()
    hinv = torch.randn(block, block).triu_()
    err = torch.randn(rows)
    ts = []
    for c in range(block - 1):
        t0 = time.perf_counter()
        work[:, c + 1 :].addr_(err, hinv[c, c + 1 :], alpha=-1)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=Path("benchmarks/results/fit_columns.json"), threads=1)
    ap.add_argument("--formats", default=DEFAULT)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) * 0.02
    rank1_us = bench_rank1(w)
    rows = [bench_format(s.strip(), w) for s in args.formats.split(",") if s.strip()]
    print(f"# one column of a [{args.rows}, {args.cols}] fp32 weight, {args.threads} thread(s)")
    print(f"{'format':16s} {'fit ms':>8s} {'column us':>10s} {'amortized us':>13s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['format']:16s} {r['fit_s'] * 1e3:8.2f} {r['column_us']:10.1f} "
            f"{r['whole_fake_quant_per_column_us']:13.1f} {r['column_vs_amortized']:6.2f}"
        )
    print(f"peer: GPTQ rank-1 update of one column in a 128-column block: {rank1_us:.1f} us")
    out = args.out
    result = {
        **header("benchmarks/fit_columns.py", argv),
        "note": (
            "synthetic N(0, 0.02) weight, seed 0; medians over every column after a burn-in"
            " pass; read ratios to the peers timed in this run (whole fake_quant / columns,"
            " GPTQ's rank-1 update), not absolutes, on a shared machine"
        ),
        "threads": args.threads,
        "shape": [args.rows, args.cols],
        "formats": rows,
        "peer_rank1_update_us": rank1_us,
    }
    write_json(out, result, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
