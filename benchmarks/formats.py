"""Speed of the number formats: M elements/s of fake_quant and quantize on a 4096x4096 fp32
tensor, with torchao's MX cast and torch's native float8 cast measured in the same run, and the
time to fake-quantize every Linear weight of a model.

    python benchmarks/formats.py                     # every preset + peers, then the 135M model
    python benchmarks/formats.py --formats mxfp4,nxfp4 --model none --reps 5 --out /tmp/f.json
    python benchmarks/formats.py --threads 1           # a shared, loaded machine

Method (nanoGPT's bench.py): fixed seed, one burn-in call, then ``--reps`` timed calls; the
median is reported. Ratios compare with a peer timed in this same run: MX quantize vs torchao's
``to_mx`` for the same element (FLOOR scale mode, the OCP rule, as ours), raw fp8 casts vs
``tensor.to(torch.float8_*)`` (which neither clamps nor keeps our saturation semantics). torchao
returns FP6 codes one per byte; ours are packed four to three bytes, so MXFP6 does more work.
On a shared machine timings are noisy: read ratios, not absolutes. ``--model none`` skips the
model; ``--threads 0`` (the default) keeps torch's own thread count, and the peers use the same.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from common import header, median_time_s, parser, write_json
from joules import formats

SHAPE = (4096, 4096)
MX_PEERS = {
    "mxfp8-e4m3": torch.float8_e4m3fn,
    "mxfp8-e5m2": torch.float8_e5m2,
    "mxfp6-e2m3": "fp6_e2m3",
    "mxfp6-e3m2": "fp6_e3m2",
    "mxfp4": torch.float4_e2m1fn_x2,
}
CAST_PEERS = {"fp8-e4m3-raw": torch.float8_e4m3fn, "fp8-e5m2-raw": torch.float8_e5m2}


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        __doc__, out=Path("benchmarks/results/formats.json"), model="smollm2-135m", threads=0
    )
    ap.add_argument("--formats", default="", help="comma-separated specs (default: every preset)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        # On a loaded shared machine 2 threads spend most of their time at OpenMP barriers.
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    n = x.numel()
    specs = [s for s in args.formats.split(",") if s] or [f.name for f in formats.list()]
    specs += [s for s in CAST_PEERS if s not in specs and not args.formats]
    rows: list[dict] = []
    peers: dict[str, float] = {}

    try:
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except ImportError:  # pragma: no cover - torchao is a dependency
        to_mx = None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if to_mx is not None:
            for spec, el in MX_PEERS.items():
                if spec in specs:
                    peers[f"torchao to_mx {spec}"] = (
                        n / median_time_s(lambda el=el: to_mx(x, el, 32), args.reps) / 1e6
                    )
        for spec, dt in CAST_PEERS.items():
            if spec in specs:
                peers[f"torch .to({dt})".replace("torch.", "")] = (
                    n / median_time_s(lambda dt=dt: x.to(dt), args.reps) / 1e6
                )
        for spec in specs:
            fmt = formats.get(spec)
            fq = n / median_time_s(lambda fmt=fmt: fmt.fake_quant(x), args.reps) / 1e6
            q = n / median_time_s(lambda fmt=fmt: fmt.quantize(x), args.reps) / 1e6
            peer_name = (
                f"torchao to_mx {spec}"
                if spec in MX_PEERS
                else (
                    f"torch .to({CAST_PEERS[spec]})".replace("torch.", "")
                    if spec in CAST_PEERS
                    else None
                )
            )
            ratio = q / peers[peer_name] if peer_name in peers else None
            rows.append(
                {
                    "format": spec,
                    "fake_quant_melem_s": fq,
                    "quantize_melem_s": q,
                    "peer": peer_name,
                    "quantize_vs_peer": ratio,
                }
            )

        model_rows: list[dict] = []
        if args.model != "none":
            from joules.formats.error import linear_weights
            from joules.models import load_model

            model, _, _ = load_model(args.model)
            weights = list(linear_weights(model).values())
            numel = sum(w.numel() for w in weights)
            for spec in specs:
                fmt = formats.get(spec)
                t0 = time.perf_counter()
                for w in weights:
                    fmt.fake_quant(w)
                dt = time.perf_counter() - t0
                model_rows.append({"format": spec, "seconds": dt, "under_10_s": dt < 10})

    print(
        f"# formats on a {SHAPE[0]}x{SHAPE[1]} fp32 tensor, {torch.get_num_threads()} threads, median of {args.reps}"
    )
    print(f"{'format':18s} {'fake_quant M/s':>15s} {'quantize M/s':>13s} {'vs peer':>8s}  peer")
    for r in rows:
        ratio = f"{r['quantize_vs_peer']:.2f}x" if r["quantize_vs_peer"] else "-"
        print(
            f"{r['format']:18s} {r['fake_quant_melem_s']:15.1f} {r['quantize_melem_s']:13.1f} {ratio:>8s}  {r['peer'] or ''}"
        )
    for name, v in peers.items():
        print(f"{'  peer: ' + name:48s} {v:10.1f} M/s")
    if model_rows:
        print(
            f"\n# fake_quant of every Linear weight of {args.model} ({numel / 1e6:.1f} M elements)"
        )
        for r in model_rows:
            print(
                f"{r['format']:18s} {r['seconds']:7.2f} s {'(under 10 s)' if r['under_10_s'] else '(OVER 10 s)'}"
            )
    out = args.out
    write_json(
        out,
        {
            **header("benchmarks/formats.py", argv),
            "shape": SHAPE,
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "formats": rows,
            "peers_melem_s": peers,
            "model": args.model,
            "model_fake_quant": model_rows,
        },
        indent=1,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
