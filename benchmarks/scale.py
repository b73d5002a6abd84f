"""The cost of every stage as the model grows: compress layer by layer, export, run in llama.cpp.

    .venv/bin/python benchmarks/scale.py --sizes 135m,1b           # ~40 min, ~6 GB of disk
    .venv/bin/python benchmarks/scale.py --sizes 135m,1b,3b,8b     # hours, ~30 GB at the peak
    .venv/bin/python benchmarks/scale.py --table                   # re-derive the table only

Per model size -- ``135m`` is the real default model (its weights were Q4_1 before joules saw
them); ``1b``, ``3b`` and ``8b`` are synthetic checkpoints (random bf16 weights written by
``joules.models.synthetic`` from the shipped Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B shapes:
**their quality figures are meaningless**, they measure time and memory) -- each stage runs as
the CLI a user types, in its own process, and is timed with its peak RSS (``wait4``'s
``ru_maxrss``) and the bytes it wrote:

    write       the synthetic checkpoint (not for 135m)
    compress    joules compress MODEL -r "gptq(format=gguf-q4_0)" --layered --calib-n N
                (load, calibrate + GPTQ, save: the manifest's split is kept)
    export      joules export DIR --to gguf --embedding gguf-q6_k --output-head gguf-q6_k
    perplexity  joules eval FILE.gguf --task wikitext2 --runtime llamacpp --limit-tokens 4096
    decode      joules bench FILE.gguf --runtime llamacpp (64-token prompt, 32 tokens, 3 runs)

Calibration: 128 x 256 tokens up to 1b, 16 x 256 for 3b and 8b (``--calib-n`` overrides; the
JSON states it per row). Resumable: a finished (size, stage) row is kept in the results JSON
while the settings are the same, and intermediates are deleted once no later stage needs them
(``--keep`` keeps them). Nothing else should run on the machine: every figure is a wall time.
Writes ``benchmarks/results/scale.json`` atomically after each stage, with the fitted time per
billion parameters and the exponent of each stage (log-log least squares over the sizes run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from common import RESULTS, figure_png, header, load_avg_1m, parser, resume, write_json
from joules.paths import cache_dir
from joules.predict.shape import ModelShape

OUT = RESULTS / "scale.json"
SIZES = {"135m": None, "1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3-8b"}
STAGES = ("write", "compress", "export", "perplexity", "decode")
RECIPE = "gptq(format=gguf-q4_0)"
PPL_TOKENS = 4096


# Seconds per billion parameters of each stage on a 2-core machine, for the plan printed before a
# run (measured: 135m and 1b in benchmarks/results/scale.json; compress at 128 x 256 calibration,
# scaled by the calibration for 16 x 256). The plan says "about": the fits in the JSON are the
# measured figures.
PLAN_S_PER_B = {
    "write": 16.0,
    "compress": 1000.0,
    "export": 60.0,
    "perplexity": 300.0,
    "decode": 80.0,
}
# Bytes per parameter on disk: the bf16 checkpoint, the compressed directory, the GGUF file.
PLAN_DISK_B_PER_PARAM = {"write": 2.0, "compress": 0.6, "export": 0.6}


def plan(sizes: list[str], calib: dict[str, int]) -> tuple[float, float]:
    """(expected seconds, peak bytes of disk) of running ``sizes`` from scratch."""
    total_s = peak_disk = 0.0
    for size in sizes:
        b = n_params(size) / 1e9
        for stage, rate in PLAN_S_PER_B.items():
            if stage == "write" and SIZES[size] is None:
                continue
            scale = (0.35 + 0.65 * calib[size] / 128) if stage == "compress" else 1.0
            total_s += rate * b * scale
        disk = sum(PLAN_DISK_B_PER_PARAM.values()) * n_params(size)
        peak_disk = max(peak_disk, disk)
    return total_s, peak_disk


def default_calib_n(size: str) -> int:
    return 16 if size in ("3b", "8b") else 128


def n_params(size: str) -> int:
    """Parameters of a size's shape (tied embeddings once), from its shipped config without
    torch: this process stays small, as ``wait4``'s peak RSS of a stage includes the RSS this
    process had when it forked the stage (Linux keeps ``ru_maxrss`` across ``exec``)."""
    name = SIZES[size] or "smollm2-135m"
    cfg = json.loads(resources.files("joules.data").joinpath("configs", f"{name}.json").read_text())
    return ModelShape.from_config(cfg, name=name).n_params


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_measured(argv: list[str]) -> dict[str, Any]:
    """Run ``argv``: its wall time, the peak RSS of its process tree (``wait4``'s ``ru_maxrss``:
    the process and the children it waited for) and the JSON it printed, if any."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(argv)}\nfailed ({proc.returncode}): {' | '.join(tail)}")
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        data = None
    return {"wall_s": round(wall_s, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "json": data}


def stage_argv(size: str, stage: str, work: Path, calib_n: int) -> tuple[list[str], Path]:
    """The command of ``stage`` for ``size`` and the path it writes."""
    py = sys.executable
    joules = str(Path(py).with_name("joules"))
    ckpt = work / f"{size}-checkpoint"
    model = "smollm2-135m" if SIZES[size] is None else str(ckpt)
    comp = work / f"{size}-gptq"
    gguf = work / f"{size}-gptq.gguf"
    if stage == "write":
        code = (
            "import sys; from joules.models.synthetic import write_synthetic; "
            "write_synthetic(sys.argv[1], sys.argv[2])"
        )
        return [py, "-c", code, str(SIZES[size]), str(ckpt)], ckpt
    if stage == "compress":
        return [joules, "compress", model, "-r", RECIPE, "-o", str(comp), "--layered",
                "--calib-n", str(calib_n), "--json"], comp  # fmt: skip
    if stage == "export":
        # the float embedding (and the untied head of the 8B shape) as llama-quantize's presets
        # store a model's output (Q6_K, Q8_0 on rows not divisible by 256), not F32: half the
        # file of a 128k-vocabulary 1B model; an 8B's F32 head alone is 2.1 GB that llama.cpp
        # would hold while it evaluates
        return [joules, "export", str(comp), "--to", "gguf", "-o", str(gguf),
                "--embedding", "gguf-q6_k", "--output-head", "gguf-q6_k", "--json"], gguf  # fmt: skip
    if stage == "perplexity":
        return [joules, "eval", str(gguf), "--task", "wikitext2", "--runtime", "llamacpp",
                "--limit-tokens", str(PPL_TOKENS), "--json"], gguf  # fmt: skip
    if stage == "decode":
        return [joules, "bench", str(gguf), "--runtime", "llamacpp", "--prompt-len", "64",
                "--gen-len", "32", "--repeats", "3", "--json"], gguf  # fmt: skip
    raise ValueError(stage)


# The stage whose product a stage reads (the synthetic checkpoint, the compressed directory,
# the GGUF file).
NEEDS = {"compress": "write", "export": "compress", "perplexity": "export", "decode": "export"}


def stages_to_run(size: str, rows: dict[str, Any], work: Path, calib_n: int) -> set[str]:
    """The stages of ``size`` to run: those without a kept row, and the producers of any input
    they read that is gone (intermediates are deleted once used), recursively."""
    todo = {s for s in STAGES if f"{size}/{s}" not in rows}
    if SIZES[size] is None:
        todo.discard("write")
    changed = True
    while changed:
        changed = False
        for stage in sorted(todo):
            need = NEEDS.get(stage)
            if need is None or need in todo or (need == "write" and SIZES[size] is None):
                continue
            if not stage_argv(size, need, work, calib_n)[1].exists():
                todo.add(need)
                changed = True
    return todo


def _summary(stage: str, data: Any) -> dict[str, Any]:
    """The few figures of a stage's JSON that the table shows."""
    if not isinstance(data, dict):
        return {}
    if stage == "compress":
        m = data.get("manifest", {})
        return {
            "steps": [
                {k: s.get(k) for k in ("name", "time_s", "peak_rss_bytes")}
                for s in m.get("steps", [])
            ],
            "timings_s": data.get("timings_s"),
            "bits_per_weight": m.get("bits_per_weight"),
            # joules compress's own pre-run prediction (made before it loaded a weight)
            "predicted": {
                k: (data.get("prediction") or {}).get(k)
                for k in ("time_s", "peak_rss_bytes", "terms_s", "memory_bytes")
            }
            if data.get("prediction")
            else None,
        }
    if stage == "export":
        return {"file_bytes": data.get("file_bytes") or data.get("bytes")}
    if stage == "perplexity":
        return {
            k: data.get(k) for k in ("perplexity", "tokens_scored", "tokens_per_s", "duration_s")
        }
    if stage == "decode":
        row = (data.get("rows") or [{}])[0]
        return {
            "decode_tok_s": row.get("decode_tok_s"),
            "prefill_tok_s": row.get("prefill_tok_s"),
            "bench_peak_rss_bytes": row.get("peak_rss_bytes"),  # joules bench's own sampling
        }
    return {}


def _compact(stage: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row kept from an earlier run that stored the stage's whole JSON, reduced as now."""
    if "result" in row:
        row = {k: v for k, v in row.items() if k != "result"} | _summary(stage, row["result"])
    return row


def fit(rows: dict[str, Any], stage: str, params: dict[str, int]) -> dict[str, Any] | None:
    """Time per billion parameters (at 1B, from the fit) and the exponent b of t = a * N^b,
    by least squares on logs over the sizes that finished ``stage``."""
    pts = [
        (params[s], r["wall_s"]) for key, r in rows.items()
        for s in [key.split("/")[0]] if key.endswith("/" + stage) and s in params
    ]  # fmt: skip
    if len(pts) < 2:
        return None
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    a = math.exp(my - b * mx)
    return {"exponent": round(b, 3), "s_per_billion_params_at_1b": round(a * 1e9**b, 1),
            "sizes": len(pts)}  # fmt: skip


def table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The docs' table: one row per (size, stage), with the stage's own figure (the GPTQ step's
    time, perplexity, decode tokens/s)."""
    rows = []
    for key, r in record["rows"].items():
        size, stage = key.split("/")
        steps = r.get("steps") or [{}]
        figure = {
            "compress": f"GPTQ step {steps[0].get('time_s', 0):.1f} s (calibration {r.get('calib_n')} x 256)",
            "perplexity": (
                f"ran at {r.get('tokens_per_s', 0):.0f} tok/s (synthetic: no quality figure)"
                if SIZES[size] is not None
                else f"ppl {r.get('perplexity', 0):.2f} at {r.get('tokens_per_s', 0):.0f} tok/s"
            ),
            "decode": f"{r.get('decode_tok_s', 0):.1f} tok/s decode",
            "export": f"{(r.get('bytes_written') or 0) / 2**20:.1f} MiB GGUF",
            "write": f"{(r.get('bytes_written') or 0) / 2**30:.2f} GiB bf16 shards",
        }[stage]
        rows.append(
            {
                "row": key,
                "size": size,
                "parameters": record["parameters"][size],
                "stage": stage,
                "wall_s": r["wall_s"],
                "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 2),
                "written_gib": round(r["bytes_written"] / 2**30, 2),
                "synthetic": SIZES[size] is not None,
                "figure": figure,
            }
        )
    return rows


MARKER = (
    "<!-- bench: results/scale.json rows=table key=row cols=wall (s)=wall_s; "
    "peak RSS (GiB)=peak_rss_gib; written (GiB)=written_gib; figure=figure -->"
)


def markdown(record: dict[str, Any]) -> str:
    """The docs' table (its marker first), as ``docs/results/scale.md`` shows it."""
    lines = [
        MARKER,
        "| size/stage | wall (s) | peak RSS (GiB) | written (GiB) | figure |",
        "|---|---|---|---|---|",
    ]
    for r in record["table"]:
        lines.append(
            f"| {r['row']} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{r['written_gib']:.2f} | {r['figure']} |"
        )
    return "\n".join(lines)


def targets(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets that this run's rows decide."""
    rows = record["rows"]
    out: dict[str, Any] = {}

    def gptq_s(size: str) -> float | None:
        r = rows.get(f"{size}/compress")
        return (r.get("steps") or [{}])[0].get("time_s") if r else None

    small, big = gptq_s("135m"), gptq_s("1b")
    if small and big:
        out["gptq_1b_over_135m"] = round(big / small, 2)
        out["gptq_1b_over_135m_target"] = 12.0
        out["params_1b_over_135m"] = round(
            record["parameters"]["1b"] / record["parameters"]["135m"], 2
        )
    for size in SIZES:
        peaks = [r["peak_rss_bytes"] for k, r in rows.items() if k.startswith(size + "/")]
        if peaks:
            out[f"peak_rss_gib_{size}"] = round(max(peaks) / 2**30, 2)
        c = rows.get(f"{size}/compress") or {}
        pred = c.get("predicted")
        if pred and pred.get("time_s"):
            # predicted / measured: the GPTQ run's wall time and the stage's peak RSS (target:
            # within 25 %)
            out[f"predicted_over_measured_time_{size}"] = round(pred["time_s"] / c["wall_s"], 3)
            out[f"predicted_over_measured_rss_{size}"] = round(
                pred["peak_rss_bytes"] / c["peak_rss_bytes"], 3
            )
    return out


FIGURE = Path(__file__).resolve().parent.parent / "docs" / "assets" / "scale_loglog.png"


def loglog_figure(record: dict[str, Any]) -> Any:
    """Wall time of each stage against parameters, both axes logarithmic, with each stage's
    fitted power law t = a * N^b drawn through its points (``fits``)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    params = record["parameters"]
    for stage in STAGES:
        pts = sorted(
            (params[k.split("/")[0]], r["wall_s"], k.split("/")[0])
            for k, r in record["rows"].items()
            if k.endswith("/" + stage) and k.split("/")[0] in params
        )
        if not pts:
            continue
        f = (record.get("fits") or {}).get(stage)
        name = stage + (f" (t ∝ N^{f['exponent']:.2f})" if f else "")
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers+text",
            text=[p[2] for p in pts], textposition="top center", name=name,
        ))  # fmt: skip
    fig.update_xaxes(type="log", title="parameters")
    fig.update_yaxes(type="log", title="wall time (s)")
    fig.update_layout(
        title="Cost of each stage as the model grows (benchmarks/results/scale.json; "
        "sizes above 135m are synthetic)",
        width=1100, height=620, template="plotly_white",
    )  # fmt: skip
    return fig


def main() -> int:
    ap = parser(__doc__, out=OUT, table=True)
    ap.add_argument("--sizes", default="135m,1b", help="comma-separated of " + ",".join(SIZES))
    ap.add_argument("--calib-n", type=int, default=None, help="calibration sequences (all sizes)")
    ap.add_argument("--work", type=Path, default=None, help="intermediates (default: cache)")
    ap.add_argument("--keep", action="store_true", help="keep intermediates")
    ap.add_argument(
        "--figure", type=Path, nargs="?", const=FIGURE,
        help="draw the log-log plot of --out's JSON into this PNG (default: %(const)s)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.figure:
        if figure_png(loglog_figure(json.loads(args.out.read_text())), args.figure) is None:
            raise SystemExit("--figure needs chromium (Debian: apt install chromium)")
        print(f"wrote {args.figure}", file=sys.stderr)
        return 0
    if args.table:
        record = json.loads(args.out.read_text())
        record["rows"] = {k: _compact(k.split("/")[1], v) for k, v in record["rows"].items()}
        record["table"] = table(record)
        record["targets"] = targets(record)
        write_json(args.out, record)
        print(markdown(record))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        print(f"unknown sizes {bad}: choose from {', '.join(SIZES)}", file=sys.stderr)
        return 2
    calib = {s: args.calib_n or default_calib_n(s) for s in SIZES}
    total_s, disk = plan(sizes, calib)
    print(
        f"plan: {', '.join(sizes)} from scratch takes about {total_s / 3600:.1f} h on 2 cores and "
        f"up to {disk / 1e9:.0f} GB of disk at once (finished rows are kept; intermediates go)",
        flush=True,
    )
    work = args.work or cache_dir() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"recipe": RECIPE, "ppl_tokens": PPL_TOKENS, "calib_n": args.calib_n}
    record = resume(args.out, settings) or {"settings": settings, "rows": {}}
    record.update(header("benchmarks/scale.py"))
    record["parameters"] = {s: n_params(s) for s in SIZES}
    record["calibration"] = {
        s: f"{args.calib_n or default_calib_n(s)} x 256 WikiText-2 valid tokens" for s in SIZES
    }
    record["synthetic_note"] = (
        "1b, 3b and 8b are random-weight checkpoints of real shapes: synthetic weights, quality "
        "figures are meaningless; 135m is the real default model, whose weights were Q4_1"
    )
    for size in sizes:
        calib_n = args.calib_n or default_calib_n(size)
        todo = stages_to_run(size, record["rows"], work, calib_n)
        for stage in STAGES:
            key = f"{size}/{stage}"
            if stage == "write" and SIZES[size] is None:
                continue
            if stage not in todo:
                print(f"{key}: kept ({record['rows'][key]['wall_s']} s)")
                continue
            argv, product = stage_argv(size, stage, work, calib_n)
            if stage in ("write", "compress", "export") and product.exists():
                shutil.rmtree(product) if product.is_dir() else product.unlink()
            print(f"{key} ...", flush=True)
            r = run_measured(argv)
            row = {
                "wall_s": r["wall_s"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "bytes_written": _dir_bytes(product)
                if stage in ("write", "compress", "export")
                else 0,
                "calib_n": calib_n if stage == "compress" else None,
                "load_avg_1m_after": load_avg_1m(),
                **_summary(stage, r["json"]),
            }
            record["rows"][key] = row
            print(f"  {row['wall_s']} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
            if stage == "export" and not args.keep:  # the GGUF file is all later stages read
                shutil.rmtree(work / f"{size}-gptq", ignore_errors=True)
            record["fits"] = {st: fit(record["rows"], st, record["parameters"]) for st in STAGES}
            record["rows"] = {k: _compact(k.split("/")[1], v) for k, v in record["rows"].items()}
            record["table"] = table(record)
            record["targets"] = targets(record)
            write_json(args.out, record)
        if not args.keep:
            shutil.rmtree(work / f"{size}-checkpoint", ignore_errors=True)
            (work / f"{size}-gptq.gguf").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
