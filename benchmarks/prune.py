"""Pruning and head clustering on the default model: magnitude vs Wanda vs SparseGPT
(unstructured and 2:4), and CHAI head clustering at several head budgets.

    python benchmarks/prune.py            # every row (WikiText-2 test, 16,384 tokens)
    python benchmarks/prune.py --table  # reprint the table from benchmarks/results/prune.json

Same protocol, calibration and paired intervals as ``benchmarks/compress.py`` (whose machinery this
reuses). Pruning saves no time on this CPU (no sparse kernel): the model stays dense, and the
table reports quality and the bits an n:m layout would take.
"""

from __future__ import annotations

from common import RESULTS
from compress import parser, retable, run, table

OUT = RESULTS / "prune.json"
ROWS = [
    "baseline",
    "prune(method=magnitude, sparsity=0.5)",
    "prune(method=wanda, sparsity=0.5)",
    "prune(method=sparsegpt, sparsity=0.5)",
    "prune(method=magnitude, pattern=2:4)",
    "prune(method=wanda, pattern=2:4)",
    "prune(method=sparsegpt, pattern=2:4)",
    "prune(method=sparsegpt, pattern=2:4) | gptq(format=int4-g64)",
    # CHAI: 9 query heads per layer; the K cache shrinks only when whole KV groups merge.
    "heads(keep=8)",
    "heads(keep=7)",
    "heads(keep=6)",
    "heads(keep=3)",
    # Per layer (min_similarity): merge only heads whose score patterns correlate at least this
    # much on calibration text (measured on the intact model: no pair reaches 0.99; at 0.9 a tenth
    # of the score patterns would merge, at 0.85 a fifth, none in layers 0-2 and 9-13).
    "heads(keep=1, min_similarity=0.95)",
    "heads(keep=1, min_similarity=0.9)",
    "heads(keep=1, min_similarity=0.85)",
]


def main() -> None:
    args = parser(__doc__).parse_args()
    path = args.results or OUT
    data = retable(path) if args.table else run(args, OUT, ROWS)
    print(table(data, path.stem))


if __name__ == "__main__":
    main()
