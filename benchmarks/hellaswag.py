"""HellaSwag accuracy of the default model under lm-eval's scoring, written to a results JSON.

    $ python benchmarks/hellaswag.py --limit 2000 --seed 1234 --dtype fp32
    $ python benchmarks/hellaswag.py --dtype fp32               # all 10,042 items (~1.5 h, 2 cores)

Runs the ``hellaswag`` task of :mod:`joules.evaluate.tasks` (lm-eval's acc / acc_norm /
acc_bytes on llama.cpp's HellaSwag text with lm-eval's ``preprocess``; ``ctx_b`` not capitalised)
and writes ``benchmarks/results/hellaswag.json``: the command, versions, machine and CPU flags, the
figures with Wilson 95 % intervals, and each item's index and picks, so the figure can be
checked item by item. The default model's weights were Q4_1 (GGUF) before joules saw them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import command, machine, parser, write_json
from joules.evaluate.scoring import set_threads
from joules.evaluate.tasks import run_task
from joules.models import load_model
from joules.runtime_dtype import resolve_dtype


def main() -> None:
    ap = parser(__doc__, out=Path("benchmarks/results/hellaswag.json"), threads=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    choice = resolve_dtype(args.dtype)
    model, tok, info = load_model("smollm2-135m", dtype=choice.dtype)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {done}/{total} items, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    r = run_task("hellaswag", model, tok, info, limit=args.limit, seed=args.seed, progress=progress)
    d = r.to_dict(predictions=True)
    print(
        f"HellaSwag {r.n} of {r.protocol.items_total} items (seed {args.seed}), {choice.name}, "
        f"{threads} threads, {r.duration_s:.0f} s"
    )
    for name in ("acc", "acc_norm", "acc_bytes"):
        lo, hi = d[f"{name}_ci95"]
        print(f"  {name:<10}{100 * d[name]:6.2f} %   ({100 * lo:.2f} - {100 * hi:.2f})")
    write_json(
        args.out,
        {
            "command": command("benchmarks/hellaswag.py"),
            "model": "smollm2-135m (SmolLM2-135M-Instruct; weights Q4_1 in its GGUF file)",
            "dtype": choice.to_dict(),
            "threads": threads,
            "machine": machine(),
            "result": d,
        },
        indent=1,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
