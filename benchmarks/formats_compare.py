"""Error of every README format on every Linear weight of the default model (the README's
format table), written to benchmarks/results/formats_compare.json.

    OMP_NUM_THREADS=1 python benchmarks/formats_compare.py
    python benchmarks/formats_compare.py --formats int8-ch,mxfp4 --out /tmp/c.json

The same computation as ``joules formats compare --source smollm2-135m --json`` (it calls the
same ``compare_formats``), with the command, versions and machine recorded beside the figures.
The default model's weights were Q4_1 (projections) and Q8_0 (tied lm_head) before we saw them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import header, parser, write_json
from joules import formats
from joules.formats.error import compare_formats, linear_weights
from joules.models import load_model

README_FORMATS = (
    "int8-ch,mxint8,fp8-e4m3,mxfp8-e4m3,mxfp6-e2m3,uint4-asym-g32,nf4,int4-g32,nxfp4,"
    "nxfp4-am,nxfp4-cr,nxfp4-nm,mxfp4,codebook4,int3-g64,ternary-g64"
)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=Path("benchmarks/results/formats_compare.json"), model="smollm2-135m")
    ap.add_argument("--formats", default=README_FORMATS)
    args = ap.parse_args(argv)
    fmts = [formats.get(s) for s in args.formats.split(",") if s]
    model, _, _ = load_model(args.model)
    tensors = linear_weights(model)
    results = compare_formats(tensors, fmts)
    print(f"# {args.model}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,}")
    print(f"{'format':16s} {'bits/elem':>9s} {'SQNR dB':>8s} {'model dB':>8s} {'clipped %':>9s}")
    for e in results:
        model_db = f"{e.sqnr_model_db:.2f}" if e.sqnr_model_db is not None else "-"
        print(
            f"{e.format:16s} {e.bits_per_element:9.3f} {e.sqnr_db:8.2f} {model_db:>8s} "
            f"{100 * e.frac_clipped:9.3f}"
        )
    out = args.out
    record = {
        **header("benchmarks/formats_compare.py", argv),
        "model": args.model,
        "tensors": len(tensors),
        "numel": sum(t.numel() for t in tensors.values()),
        "results": [e.to_dict() for e in results],
    }
    write_json(out, record, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
