"""Speed of one compressed linear: torch's CPU int8/int4 kernels vs the emulated path vs fp32.

    flock /tmp/joules-heavy.lock python benchmarks/linear_kernels.py       # writes benchmarks/results/kernels.json
    python benchmarks/linear_kernels.py --formats int4-g64 --tokens 1 --reps 5 --out /tmp/k.json

For each weight shape of SmolLM2-135M's MLP (out x in = 1536x576: gate/up, 576x1536: down), each
token count (1: decode, 128: a prefill chunk) and each format with a kernel, it times:

- ``fp32``: dense ``F.linear`` on the fp32 weight (the baseline every ratio is against),
- ``bf16``: dense ``F.linear`` with bf16 weight and activations,
- ``emulated-fp32`` / ``emulated-bf16``: what a compressed linear does without a kernel
  (dequantize the packed weight, then ``F.linear``) at that activation dtype,
- ``kernel-fp32`` / ``kernel-bf16``: the packed weight through the kernel (packing done once,
  outside the timer) with fp32 or bf16 activations.

Method (nanoGPT's bench.py): fixed seed, burn-in call, ``--reps`` timed calls, median reported,
``speedup = fp32 median / this median`` from the same run. The activation dtype each kernel
runs in on this CPU (:func:`joules.compress.modules.kernels.compute_dtype`'s probe) is recorded too.
Threads default to 1: the machine is shared, and one thread gives stable ratios.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from common import command, machine, median_time_s, parser, retable_file, write_json
from joules import formats
from joules.compress.modules import kernels as K
from joules.system import backfill_machine, system_info
from joules.system import cpu_flags as system_cpu_flags

SHAPES = [(1536, 576), (576, 1536)]  # (out_features, in_features)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags() -> dict[str, bool]:
    """The kernels' flags as the results JSON records them (present or not), from
    ``joules.system.cpu_flags``."""
    have = set(system_cpu_flags())
    return {
        f: f in have
        for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni")
    }


class Cycle:
    """Calls ``fn(i)`` for i = 0, 1, ..., copies - 1, 0, ...: with enough distinct weights the
    working set exceeds the last-level cache, as a whole model's weights do in decoding."""

    def __init__(self, fn: Callable[[int], object], copies: int) -> None:
        self.fn, self.copies, self.i = fn, copies, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % self.copies
        return self.fn(self.i)


def bench_case(spec: str, shape: tuple[int, int], tokens: int, reps: int, copies: int = 1) -> dict:
    n, k = shape
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(copies)]
    x = torch.randn(tokens, k, generator=g)
    qs = [formats.get(spec).quantize(w) for w in ws]
    del ws
    kernel = K.find_kernel(qs[0])
    assert kernel is not None, f"{spec} has no kernel: {K.why_no_kernel(qs[0])}"
    t: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    reps = max(reps, 2 * copies if copies > 1 else reps)
    for name, dt in DT.items():
        xn = x.to(dt)
        dense = [q.dequantize().to(dt) for q in qs]
        t[name] = median_time_s(Cycle(lambda i, xn=xn, d=dense: F.linear(xn, d[i]), copies), reps)
        del dense
        t[f"emulated-{name}"] = median_time_s(
            Cycle(lambda i, xn=xn, dt=dt: F.linear(xn, qs[i].dequantize().to(dt)), copies), reps
        )
        packed = [kernel.pack(q, dt) for q in qs]
        nbytes[name] = packed[0].nbytes
        t[f"kernel-{name}"] = median_time_s(
            Cycle(lambda i, xn=xn, p=packed: kernel.mm(xn, p[i]), copies), reps
        )
        del packed
    return {
        "format": spec,
        "kernel": kernel.name,
        "out_features": n,
        "in_features": k,
        "tokens": tokens,
        "distinct_weights": copies,
        "median_s": t,
        "speedup_vs_fp32": {key: t["fp32"] / v for key, v in t.items()},
        "kernel_vs_emulated_same_dtype": {
            name: t[f"emulated-{name}"] / t[f"kernel-{name}"] for name in DT
        },
        "packed_nbytes": nbytes,
        "fp32_nbytes": n * k * 4,
    }


SPEEDUPS = ("bf16", "emulated-fp32", "emulated-bf16", "kernel-fp32", "kernel-bf16")
# README header -> field of a ``table`` row (the marker ties each column to its field)
COLUMNS = {
    "fp32 F.linear": "fp32_ms",
    "bf16 F.linear": "bf16_x",
    "emulated fp32": "emulated_fp32_x",
    "emulated bf16": "emulated_bf16_x",
    "kernel, fp32 act.": "kernel_fp32_x",
    "kernel, bf16 act.": "kernel_bf16_x",
}


def table_rows(rows: list[dict]) -> list[dict]:
    """One flat object per README row: exactly the figures the table shows."""
    out = []
    for r in rows:
        s = r["speedup_vs_fp32"]
        out.append(
            {
                "label": f"`{r['format']}` ({r['kernel']})",
                "shape": f"{r['out_features']}x{r['in_features']}",
                "tokens": r["tokens"],
                "fp32_ms": r["median_s"]["fp32"] * 1e3,
                **{f"{c.replace('-', '_')}_x": s[c] for c in SPEEDUPS},  # COLUMNS' fields
            }
        )
    return out


def retable(data: dict) -> dict:
    """Add the ``table`` rows (re-derived from the measured ``rows``, nothing re-measured) and,
    for a JSON written before it was recorded, ``machine`` (CPU flags) from this VM."""
    data["table"] = table_rows(data["rows"])
    return backfill_machine(data)


def table(data: dict, source: str = "results/kernels.json") -> str:
    """The README table (markdown) from the JSON's ``table`` rows: speedups vs fp32 ``F.linear``."""
    cd = ", ".join(f"{k}: {v['dtype']}" for k, v in data["compute_dtype"].items())
    lines = [
        f"<!-- {data['system']['cpu_model']}, {data['threads']} thread(s), "
        f"{data.get('distinct_weights', 1)} distinct weight(s) cycled; chosen activation dtype "
        f"{cd} -->",
        f"<!-- bench: {source} rows=table key=label,shape,tokens cols="
        + "; ".join(f"{h}={f}" for h, f in COLUMNS.items())
        + " -->",
        "| format (kernel) | out x in | tokens | " + " | ".join(COLUMNS) + " |",
        "|---" * (3 + len(COLUMNS)) + "|",
    ]
    for r in data.get("table") or table_rows(data["rows"]):
        cells = [f"{r['fp32_ms']:.3f} ms"] + [f"{r[f]:.2f}x" for f in list(COLUMNS.values())[1:]]
        lines.append(f"| {r['label']} | {r['shape']} | {r['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=Path("benchmarks/results/kernels.json"), threads=1, table=True)
    ap.add_argument("--formats", default="int8-ch,int4-g32,int4-g64,uint4-asym-g64")
    ap.add_argument("--tokens", default="1,128", help="activation rows (tokens) per call")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument(
        "--copies",
        type=int,
        default=1,
        help="distinct weights cycled through (1: one weight, hot in cache; 90: the working "
        "set of SmolLM2-135M's 90 MLP matrices, larger than the 32 MiB L3 even at 4 bits)",
    )
    args = ap.parse_args(argv)
    if args.table:
        return retable_file(args.out, retable, table)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = [s for s in args.formats.split(",") if s]
    token_counts = [int(s) for s in args.tokens.split(",") if s]

    choices = {kn.name: K.compute_dtype(kn.name, refresh=True) for kn in K.kernels("cpu")}
    rows = []
    hdr = f"{'format':16s} {'shape':>9s} {'tok':>4s} " + " ".join(
        f"{c:>13s}" for c in ("fp32 ms", "bf16", "emul-fp32", "emul-bf16", "kern-fp32", "kern-bf16")
    )
    print(f"speedup vs fp32 F.linear (x faster), {args.threads} thread(s)\n{hdr}")
    for spec in specs:
        for shape in SHAPES:
            for tok in token_counts:
                r = bench_case(spec, shape, tok, args.reps, args.copies)
                rows.append(r)
                s = r["speedup_vs_fp32"]
                print(
                    f"{spec:16s} {shape[0]:>4d}x{shape[1]:<4d} {tok:>4d} "
                    f"{r['median_s']['fp32'] * 1e3:13.3f} "
                    + " ".join(f"{s[c]:13.2f}" for c in SPEEDUPS)
                )
    for c in choices.values():
        print(f"{c.kernel}: compute dtype {c.dtype} ({c.reason})")
    out = args.out
    write_json(
        out,
        {
            "command": command("benchmarks/linear_kernels.py", argv),
            "system": system_info().to_dict(),
            "cpu_flags": cpu_flags(),
            "threads": args.threads,
            "reps": args.reps,
            "distinct_weights": args.copies,
            "compute_dtype": {
                name: {
                    "dtype": c.dtype,
                    "reason": c.reason,
                    "fp32_s": c.fp32_s,
                    "bf16_s": c.bf16_s,
                }
                for name, c in choices.items()
            },
            "rows": rows,
            "machine": machine(),
            "table": table_rows(rows),
        },
        indent=1,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
