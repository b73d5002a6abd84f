"""The 4-bit table: joules' 4-bit recipes and the peer libraries, side by side, paired with the
same baseline on the same WikiText-2 test windows.

    python benchmarks/compress4.py                # reads the two JSONs below, writes compress4.json
    python benchmarks/compress4.py --rows-json /tmp/compress.json --peers-json benchmarks/results/peers.json

Inputs: the quality rows of ``benchmarks/compress.py`` (joules recipes, each compressed by the real
CLI in its own process, then scored; its baseline row is the fp32 copy of the default model's
Q4_1 weights) and the peer rows of ``benchmarks/peers/run.py`` (run in its own venv on the same
baseline, tokens, windows and calibration). A peer row is paired with the joules baseline only
when its own baseline control (the same model scored in the peers' venv) matches ours window by
window, i.e. the two venvs scored the same tokens the same way; otherwise the row is marked
unpaired. Gap closed = (NLL gap of RTN - gap of the row) / gap of RTN, same format.
``uint4-asym-g32`` (which reproduces the Q4_1 weights exactly) and the 3-bit rows are left out.
Cheap: it only reads the two JSONs, so re-run it whenever ``compress.json`` gains rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from common import header, parser, write_json
from joules.evaluate.paired import paired_difference
from joules.evaluate.results import PerplexityResult
from joules.serialize import atomic_write_text

HERE = Path(__file__).resolve().parent
FAMILIES = (
    "int4-g64",
    "int4-g32",
    "uint4-asym-g64",
    "nf4",
    "mxfp4",
    "nxfp4",
    "codebook4",
    "int8-ch",
)
# the peers benchmarks/peers/run.py runs by default (peers.json's "planned" list wins when present)
PLANNED_PEERS = (
    "torchao-int8-wo",
    "hqq-4bit-g64",
    "quanto-qint4-g64",
    "llmcompressor-gptq-w4a16-g64",
)
BUDGET_BITS = 4.5  # the target: the best joules recipe at <= 4.5 bits/weight
TARGET_RATIO = 1.10  # ... within 10 % of the baseline perplexity
LIBRARY = {
    "torchao": "torchao",
    "hqq": "HQQ",
    "quanto": "optimum-quanto",
    "llmcompressor": "llm-compressor",
    "gptqmodel": "GPTQModel",
}


def result_of(d: dict[str, Any]) -> PerplexityResult:
    return PerplexityResult.from_dict(d)


def _same_windows(a: PerplexityResult, b: PerplexityResult, tol: float = 1e-3) -> bool:
    """Same windows, same token counts and (to ``tol`` relative) the same NLL per window."""
    if a.window_tokens != b.window_tokens or not a.window_nll_sums:
        return False
    return all(
        abs(x - y) <= tol * max(1.0, abs(y))
        for x, y in zip(a.window_nll_sums, b.window_nll_sums, strict=True)
    )


def label(recipe: str) -> str:
    """A recipe as a table key: a Markdown cell cannot hold the pipe of ``awq(...) | gptq(...)``."""
    return recipe.replace(" | ", " then ")


def _format_of(recipe: str) -> str:
    return recipe.split("format=", 1)[-1].split(")")[0].split(",")[0]


def _wanted(recipe: str) -> bool:
    return recipe == "baseline" or _format_of(recipe) in FAMILIES


def _unmeasured(name: str, note: str) -> dict[str, Any]:
    """A peer row with no figures (planned or not runnable), saying why in ``note``."""
    return {
        "row": name,
        "recipe": name,
        "by": LIBRARY.get(name.split("-", 1)[0], name),
        "bits_per_weight": None,
        "perplexity": None,
        **_paired_fields(None),
        "gap_closed_pct": None,
        "time_s": None,
        "peak_rss_gib": None,
        "note": note,
    }


def _paired_fields(pv: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "ppl_ratio": pv["ppl_ratio"] if pv else None,
        "ppl_ratio_lo": pv["ppl_ratio_ci95"][0] if pv else None,
        "ppl_ratio_hi": pv["ppl_ratio_ci95"][1] if pv else None,
    }


def _joules_rows(rows: dict[str, Any], base: PerplexityResult) -> list[dict[str, Any]]:
    table = []
    for recipe, e in rows.items():
        if not _wanted(recipe):
            continue
        pv = paired_difference(result_of(e["perplexity"]), base).to_dict()
        rss = e.get("compress_peak_rss_bytes")
        table.append(
            {
                "row": label(recipe),
                "recipe": recipe,
                "by": "joules",
                "bits_per_weight": e.get("bits_per_weight") or 32.0,
                "perplexity": e["perplexity"]["perplexity"],
                **_paired_fields(pv),
                "paired": pv,
                "gap_closed_pct": None,
                "time_s": e.get("compress_time_s"),
                "peak_rss_gib": rss / 2**30 if rss else None,
                "note": "fp32 copy of Q4_1 weights" if recipe == "baseline" else None,
                "linear_paths": e.get("linear_paths"),
            }
        )
    gaps = {t["recipe"]: t["paired"]["delta_nll"] for t in table}
    for t in table:
        if t["recipe"] == "baseline" or t["recipe"].startswith("rtn("):
            continue
        g_rtn = gaps.get(f"rtn(format={_format_of(t['recipe'])})")
        if g_rtn and g_rtn > 0:
            t["gap_closed_pct"] = 100 * (g_rtn - gaps[t["recipe"]]) / g_rtn
    return table


def _peer_rows(peers: dict[str, Any], base: PerplexityResult) -> tuple[list[dict], dict]:
    prow = peers.get("rows", {})
    control = prow.get("baseline", {}).get("perplexity")
    paired_ok = control is not None and _same_windows(result_of(control), base)
    table: list[dict[str, Any]] = []
    for name, e in prow.items():
        lib = LIBRARY.get(name.split("-", 1)[0], name.split("-", 1)[0])
        row: dict[str, Any] = {"row": name, "recipe": name, "by": lib}
        if name == "baseline":
            row.update(row="baseline (peers' venv)", by="control")
        if "error" in e:
            row.update(
                bits_per_weight=None,
                perplexity=None,
                **_paired_fields(None),
                note=f"failed: {e['error'][:80]}".replace("|", "/").replace("\n", " "),
            )
        else:
            pv = (
                paired_difference(result_of(e["perplexity"]), base).to_dict() if paired_ok else None
            )
            rss = e.get("quantize_peak_rss_bytes")
            row.update(
                bits_per_weight=e.get("bits_per_weight_held") if name != "baseline" else 32.0,
                perplexity=e["perplexity"]["perplexity"],
                **_paired_fields(pv),
                paired=pv,
                time_s=e.get("quantize_time_s"),
                peak_rss_gib=rss / 2**30 if rss else None,
                note=None if paired_ok else "unpaired: control differs",
                config=e.get("config"),
                stored=e.get("stored"),
            )
        row.setdefault("gap_closed_pct", None)
        row.setdefault("time_s", None)
        row.setdefault("peak_rss_gib", None)
        table.append(row)
    for name in peers.get("planned") or PLANNED_PEERS:
        if name not in prow and name != "baseline":
            table.append(_unmeasured(name, "not measured yet: benchmarks/peers/run.py resumes"))
    for name, why in peers.get("not_runnable", {}).items():
        note = "not runnable here: needs torch>=2.14.1, transformers>=5.20.2"
        table.append({**_unmeasured(name, note), "reason": why})
    info = {
        "versions": peers.get("versions"),
        "settings": peers.get("settings"),
        "created_utc": peers.get("created_utc"),
        "baseline_control_matches": paired_ok,
        "baseline_control_perplexity": control["perplexity"] if control else None,
        "shared_machine": peers.get("shared_machine"),
        "runs": peers.get("runs"),
    }
    return table, info


def _vs(a: dict[str, Any], b: dict[str, Any], results: dict[str, PerplexityResult]) -> dict:
    """Paired ``a - b`` over the same windows (both scored against the same tokens)."""
    pv = paired_difference(results[a["row"]], results[b["row"]])
    return {
        "ppl_ratio": pv.ppl_ratio,
        "ppl_ratio_ci95": list(pv.ppl_ratio_ci95),
        "significant": pv.significant,
    }


def summary(
    table: list[dict[str, Any]], results: dict[str, PerplexityResult], paired_peers: bool
) -> dict[str, Any]:
    """The issue's targets, computed from the table (None where a row is missing)."""
    by = {t["row"]: t for t in table}
    out: dict[str, Any] = {}
    awq, gptq = by.get("awq(format=int4-g64)"), by.get("gptq(format=int4-g64)")
    both = by.get(label("awq(format=int4-g64) | gptq(format=int4-g64)"))
    out["awq_gap_closed_pct"] = awq["gap_closed_pct"] if awq else None
    out["awq_meets_30pct"] = awq["gap_closed_pct"] >= 30 if awq else None
    if both:
        out["awq_gptq_gap_closed_pct"] = both["gap_closed_pct"]
        alone = [t for t in (awq, gptq) if t]
        out["awq_gptq_vs_alone"] = {t["row"]: _vs(both, t, results) for t in alone}
        out["awq_gptq_beats_both"] = len(alone) == 2 and all(
            both["perplexity"] < t["perplexity"] for t in alone
        )
    mine = [
        t
        for t in table
        if t["by"] == "joules" and t["recipe"] != "baseline" and t["bits_per_weight"] <= BUDGET_BITS
    ]
    if mine:
        best = min(mine, key=lambda t: t["perplexity"])
        out["best_joules"] = {
            "row": best["row"],
            "bits_per_weight": best["bits_per_weight"],
            "perplexity": best["perplexity"],
            "ppl_ratio": best["ppl_ratio"],
            "ppl_ratio_ci95": [best["ppl_ratio_lo"], best["ppl_ratio_hi"]],
            "within_10pct": best["ppl_ratio"] <= TARGET_RATIO,
        }
        vs = {}
        for p in table:
            if p["by"] in ("joules", "control") or p["perplexity"] is None:
                continue
            if p["bits_per_weight"] >= 8:  # the int8 peer is not a 4-bit row
                continue
            d = {
                "peer_bits_per_weight": p["bits_per_weight"],
                "peer_perplexity": p["perplexity"],
                "joules_at_equal_or_fewer_bits": best["bits_per_weight"] <= p["bits_per_weight"],
                # perplexities compare only over the same windows (the control matched)
                "joules_at_or_below": (
                    best["perplexity"] <= p["perplexity"] if paired_peers else None
                ),
            }
            if paired_peers:
                d["paired_joules_over_peer"] = _vs(best, p, results)
            vs[p["row"]] = d
        out["best_joules_vs_peers"] = vs
    return out


def build(rows_json: Path, peers_json: Path | None, argv: list[str] | None = None) -> dict:
    raw = rows_json.read_bytes()
    data = json.loads(raw)
    rows = data["rows"]
    base = result_of(rows["baseline"]["perplexity"])
    table = _joules_rows(rows, base)
    results = {t["row"]: result_of(rows[t["recipe"]]["perplexity"]) for t in table}
    peers_info: dict[str, Any] = {}
    paired_peers = False
    if peers_json is not None and peers_json.is_file():
        peers = json.loads(peers_json.read_text())
        ptable, peers_info = _peer_rows(peers, base)
        paired_peers = peers_info["baseline_control_matches"]
        for t in ptable:
            e = peers["rows"].get(t["recipe"], {})
            if "perplexity" in e:
                results[t["row"]] = result_of(e["perplexity"])
        table += ptable
    head = header("benchmarks/compress4.py", argv)
    return {
        **head,
        "inputs": {
            "rows_json": str(rows_json),
            "rows_json_sha256": hashlib.sha256(raw).hexdigest(),
            "rows_json_command": data.get("command"),
            "rows_json_machine_load": "see compress.json: measured on the same shared VM",
            "peers_json": str(peers_json) if peers_json else None,
        },
        "settings": data.get("settings"),
        "joules_versions": data.get("versions"),
        "peers": peers_info,
        "summary": summary(table, results, paired_peers),
        "table": [{k: v for k, v in t.items() if k != "paired"} for t in table],
        "rows": table,
    }


COLS = [
    ("by", "by", None),
    ("bits/weight", "bits_per_weight", 3),
    ("perplexity", "perplexity", 3),
    ("x baseline", "ppl_ratio", 4),
    ("95 % lo", "ppl_ratio_lo", 4),
    ("95 % hi", "ppl_ratio_hi", 4),
    ("gap closed vs RTN %", "gap_closed_pct", 0),
    ("quantize s", "time_s", 0),
    ("peak RSS GiB", "peak_rss_gib", 2),
    ("notes", "note", None),
]


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"] or {}
    lines = [
        f"{s.get('tokens')} WikiText-2 test tokens, window {s.get('window')}, calibration "
        f"{s.get('calib_n')} x {s.get('calib_len')} valid tokens, {s.get('threads')} thread(s):",
        "",
        "<!-- bench: results/compress4.json rows=table key=row cols="
        + "; ".join(f"{h}={f}" for h, f, _ in COLS)
        + " -->",
        "| recipe / peer | " + " | ".join(h for h, _, _ in COLS) + " |",
        "|---" * (len(COLS) + 1) + "|",
    ]
    for r in out["table"]:
        cells = []
        for _, f, dec in COLS:
            v = r.get(f)
            cells.append("-" if v is None else (str(v) if dec is None else f"{v:.{dec}f}"))
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _x(r: dict[str, Any] | None) -> str:
    return "not run yet" if r is None else f"x{r['ppl_ratio']:.4f}"


def prose(out: dict[str, Any]) -> str:
    """The lines under the table, every figure taken from ``summary`` and ``table``."""
    sm, by = out["summary"], {t["row"]: t for t in out["table"]}
    lines = []
    pinfo = out.get("peers") or {}
    if pinfo.get("baseline_control_matches"):
        lines.append(
            "The baseline scored in the peers' venv matches joules' window by window, so every "
            "peer is paired with the same baseline."
        )
    elif pinfo:
        lines.append(
            "The peers' baseline control is missing or differs from joules': peer rows are unpaired."
        )
    if sm.get("awq_gap_closed_pct") is not None:
        ok = "met" if sm["awq_meets_30pct"] else "missed"
        lines.append(
            f"AWQ closes {sm['awq_gap_closed_pct']:.0f} % of RTN's NLL gap at int4-g64 "
            f"(target >= 30 %: {ok})."
        )
    both = by.get(label("awq(format=int4-g64) | gptq(format=int4-g64)"))
    if both is not None:
        vs = sm["awq_gptq_vs_alone"]
        parts = [
            f"{k.split('(')[0].upper()} alone {_x(by[k])} (paired AWQ+GPTQ / it: "
            f"x{v['ppl_ratio']:.4f}, 95 % {v['ppl_ratio_ci95'][0]:.4f}-{v['ppl_ratio_ci95'][1]:.4f})"
            for k, v in vs.items()
        ]
        word = "better than" if sm["awq_gptq_beats_both"] else "not better than both of"
        lines.append(f"AWQ then GPTQ: {_x(both)} of the baseline, {word} " + "; ".join(parts) + ".")
    else:
        lines.append("AWQ then GPTQ at int4-g64: not in compress.json yet.")
    best = sm.get("best_joules")
    if best:
        ok = "met" if best["within_10pct"] else "missed"
        lines.append(
            f"joules' best recipe at <= {BUDGET_BITS} bits/weight is `{best['row']}` "
            f"({best['bits_per_weight']:.3f} bits): x{best['ppl_ratio']:.4f} of the baseline "
            f"(target <= x{TARGET_RATIO:.2f}: {ok})."
        )
        peers = []
        for name, d in sm.get("best_joules_vs_peers", {}).items():
            pv = d.get("paired_joules_over_peer")
            if pv is None:
                peers.append(f"{name} unpaired")
                continue
            fewer = "fewer or equal bits" if d["joules_at_equal_or_fewer_bits"] else "more bits"
            peers.append(
                f"{name} ({d['peer_bits_per_weight']:.3f} bits, {fewer} for joules): joules/peer "
                f"x{pv['ppl_ratio']:.4f} (95 % {pv['ppl_ratio_ci95'][0]:.4f}-"
                f"{pv['ppl_ratio_ci95'][1]:.4f})"
            )
        if not peers:
            lines.append("No 4-bit peer has been measured yet: that comparison is still open.")
        else:
            lines.append(
                "Against the 4-bit peers, paired on the same windows: " + "; ".join(peers) + "."
            )
    return "\n".join(lines)


README_BLOCK_HEAD = """**The 4-bit table against the peers** (`python benchmarks/compress4.py --readme`; JSON in
`benchmarks/results/compress4.json`). joules' rows are those of `benchmarks/results/compress.json` (4-bit
formats, and int8 beside torchao's int8); the peers run from their own venv
(`benchmarks/peers/run.py`; exact versions in `benchmarks/peers/requirements-lock.txt`) on the same fp32
copy of the Q4_1 baseline, the same 210 linears (every `nn.Linear` in `model.layers`; the tied
embedding stays fp32), the same WikiText-2 test windows and, for llm-compressor's GPTQ, joules'
calibration set. bits/weight counts what each stores for those linears (HQQ: scale and zero kept
in fp16; optimum-quanto: fp32 scale and shift; llm-compressor: its compressed checkpoint, fp32
scales). Times and peak RSS are of the quantization step in its own process, one thread, on the
shared 2-vCPU VM (load average 5-9, niced): indicative only. GPTQModel is listed, not run.
llm-compressor's `GPTQModifier` ran with its defaults apart from the group (dampening 0.01, block
128, static activation order, min-max group scales); joules' `gptq` also uses dampening 0.01,
block 128 and activation order by default. Activation order is most of what separates the GPTQ
rows: joules' x1.141 with it, x1.274 without (`act_order=false`); llm-compressor's x1.219 lies
between, and what is left of that gap was not traced further.

"""


README_START, README_END = "<!-- compress4-table-start -->", "<!-- compress4-table-end -->"


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the compress4 markers; False when the markers are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, f"{head}{README_START}\n{block}\n{README_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=HERE / "results" / "compress4.json")
    ap.add_argument("--rows-json", default=str(HERE / "results" / "compress.json"))
    ap.add_argument("--peers-json", default=str(HERE / "results" / "peers.json"))
    ap.add_argument(
        "--readme",
        action="store_true",
        help="rewrite the compress4 block of docs/results/compress.md",
    )
    args = ap.parse_args(argv)
    out = build(Path(args.rows_json), Path(args.peers_json), argv)
    write_json(args.out, out, indent=1)
    block = markdown(out) + "\n\n" + prose(out)
    print(block)
    page = HERE.parent / "docs" / "results" / "compress.md"  # the results page holds the table
    if args.readme and not update_readme(page, README_BLOCK_HEAD + block):
        print(f"{page} has no {README_START} ... {README_END} block: nothing replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
