"""The 4-bit table: joules' 4-bit recipes and the peer libraries, side by side, paired with the
same baseline on the same WikiText-2 test windows.

    python bench/compress4.py                     # reads the two JSONs below, writes compress4.json
    python bench/compress4.py --rows-json /tmp/compress.json --peers-json bench/results/peers.json

Inputs: the quality rows of ``bench/compress.py`` (joules recipes, each compressed by the real
CLI in its own process, then scored; its baseline row is the fp32 copy of the default model's
Q4_1 weights) and the peer rows of ``bench/peers/run.py`` (run in its own venv on the same
baseline, tokens, windows and calibration). A peer row is paired with the joules baseline only
when its own baseline control (the same model scored in the peers' venv) matches ours window by
window, i.e. the two venvs scored the same tokens the same way; otherwise the row is marked
unpaired. Gap closed = (NLL gap of RTN - gap of the row) / gap of RTN, same format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from joules.evaluate.paired import paired_difference
from joules.evaluate.results import PerplexityProtocol, PerplexityResult

HERE = Path(__file__).resolve().parent
FOUR_BIT = ("int4-g64", "int4-g32", "uint4-asym-g64", "nf4", "mxfp4", "nxfp4")


def result_of(d: dict[str, Any]) -> PerplexityResult:
    d = dict(d)
    d["protocol"] = PerplexityProtocol(**d["protocol"])
    for k in ("perplexity", "perplexity_ci95", "bits_per_byte", "tokens_per_s"):
        d.pop(k, None)
    return PerplexityResult(**d)


def _same_windows(a: PerplexityResult, b: PerplexityResult, tol: float = 1e-3) -> bool:
    """Same windows, same token counts and (to ``tol`` relative) the same NLL per window."""
    if a.window_tokens != b.window_tokens or not a.window_nll_sums:
        return False
    return all(
        abs(x - y) <= tol * max(1.0, abs(y))
        for x, y in zip(a.window_nll_sums, b.window_nll_sums, strict=True)
    )


def build(rows_json: Path, peers_json: Path | None) -> dict[str, Any]:
    data = json.loads(rows_json.read_text())
    rows = data["rows"]
    base = result_of(rows["baseline"]["perplexity"])
    table: list[dict[str, Any]] = []
    for recipe, e in rows.items():
        if recipe != "baseline" and not any(f in recipe for f in (*FOUR_BIT, "int8")):
            continue
        r = result_of(e["perplexity"])
        pv = paired_difference(r, base) if recipe != "baseline" else None
        table.append(
            {
                "name": recipe,
                "by": "joules",
                "bits_per_weight": e.get("bits_per_weight"),
                "perplexity": e["perplexity"]["perplexity"],
                "paired": pv.to_dict() if pv else None,
                "time_s": e.get("compress_time_s"),
                "peak_rss_bytes": e.get("compress_peak_rss_bytes"),
                "linear_paths": e.get("linear_paths"),
            }
        )
    gaps = {t["name"]: t["paired"]["delta_nll"] for t in table if t["paired"]}
    for t in table:
        if t["paired"] and not t["name"].startswith("rtn("):
            fmt = t["name"].split("format=", 1)[-1].split(")")[0].split(",")[0]
            g_rtn = gaps.get(f"rtn(format={fmt})")
            if g_rtn and g_rtn > 0:
                t["gap_closed_vs_rtn"] = (g_rtn - gaps[t["name"]]) / g_rtn
    peers: dict[str, Any] = {}
    if peers_json is not None and peers_json.is_file():
        peers = json.loads(peers_json.read_text())
        prow = peers.get("rows", {})
        control = prow.get("baseline", {}).get("perplexity")
        paired_ok = control is not None and _same_windows(result_of(control), base)
        for name, e in prow.items():
            if name == "baseline":
                continue
            entry: dict[str, Any] = {"name": name, "by": "peer"}
            if "error" in e:
                entry["error"] = e["error"]
            else:
                r = result_of(e["perplexity"])
                entry.update(
                    bits_per_weight=e.get("bits_per_weight_held"),
                    perplexity=e["perplexity"]["perplexity"],
                    paired=paired_difference(r, base).to_dict() if paired_ok else None,
                    time_s=e.get("quantize_time_s"),
                    peak_rss_bytes=e.get("quantize_peak_rss_bytes"),
                    config=e.get("config"),
                )
            table.append(entry)
        for name, why in peers.get("not_runnable", {}).items():
            table.append({"name": name, "by": "peer", "error": f"not runnable: {why}"})
        peers = {
            "versions": peers.get("versions"),
            "settings": peers.get("settings"),
            "baseline_control_matches": paired_ok,
            "baseline_control_perplexity": control["perplexity"] if control else None,
        }
    return {
        "command": "python bench/compress4.py " + " ".join(sys.argv[1:]),
        "settings": data.get("settings"),
        "joules_versions": data.get("versions"),
        "peers": peers,
        "rows": table,
    }


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"] or {}
    lines = [
        f"<!-- bench: results/compress4.json ({s.get('tokens')} WikiText-2 test tokens, window "
        f"{s.get('window')}; calibration {s.get('calib_n')} x {s.get('calib_len')} valid) -->",
        "| by | recipe / peer | bits/weight | perplexity | × baseline (95 % paired CI) "
        "| gap closed vs RTN | time | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in out["rows"]:
        if "error" in t:
            lines.append(f"| {t['by']} | {t['name']} | | {t['error'][:120]} | | | | |")
            continue
        bpw = f"{t['bits_per_weight']:.3f}" if t.get("bits_per_weight") else "32 (fp32)"
        pv = t.get("paired")
        ratio = (
            f"{pv['ppl_ratio']:.4f} ({pv['ppl_ratio_ci95'][0]:.4f}–{pv['ppl_ratio_ci95'][1]:.4f})"
            if pv
            else ("" if t["name"] == "baseline" else "unpaired")
        )
        gap = t.get("gap_closed_vs_rtn")
        gap_s = f"{100 * gap:.0f} %" if gap is not None else ""
        tm = f"{t['time_s']:.0f} s" if t.get("time_s") is not None else ""
        rss = f"{t['peak_rss_bytes'] / 2**30:.2f} GiB" if t.get("peak_rss_bytes") else ""
        name = f"`{t['name']}`" if t["by"] == "joules" else t["name"]
        lines.append(
            f"| {t['by']} | {name} | {bpw} | {t['perplexity']:.3f} | {ratio} | {gap_s} "
            f"| {tm} | {rss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-json", default=str(HERE / "results" / "compress.json"))
    ap.add_argument("--peers-json", default=str(HERE / "results" / "peers.json"))
    ap.add_argument("--out", default=str(HERE / "results" / "compress4.json"))
    args = ap.parse_args(argv)
    out = build(Path(args.rows_json), Path(args.peers_json))
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
