"""The HTML report of a sweep store: one self-contained file (plotly's JavaScript inlined).

    >>> from joules.report import render_report          # doctest: +SKIP
    >>> render_report("joules.db", "report.html")         # doctest: +SKIP
    PosixPath('report.html')

Sections: perplexity vs J/token and vs bits/weight (the Pareto front of each model and
workload highlighted, never one across them; hover names the recipe, its methods and the run
key), per-layer bits and weight SQNR (a heatmap of decoder block × layer kind per run, in model
order, one run at a time from a menu), the prefill/decode power timeline of each bench,
predicted vs measured, and a provenance table. The recommended run (``recommend`` with the
given constraints and objective, per workload) is marked ★ in every plot. Each figure's *method* sets its marker and line style:
measured (filled circle, solid), estimated (open circle, dotted), emulated kernels (diamond,
dash-dot), predicted (open triangle, dashed). Opening the file needs no network; a script error
is written into ``#joules-errors`` (the browser test reads it).
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.report.data import ReportData, load_report_data, recipe_methods
from joules.serialize import atomic_write_text
from joules.sweep.analyze import Constraints, candidates, pareto_fronts, recommend
from joules.sweep.results import kernel_method
from joules.sweep.store import Metric, RunRow

# (marker symbol, line dash) per kind of figure; the legend and the key at the top say which.
STYLES = {
    "measured": ("circle", "solid"),
    "estimated": ("circle-open", "dot"),
    "emulated": ("diamond", "dashdot"),
    "estimated; emulated": ("diamond-open", "dot"),
    "predicted": ("triangle-up-open", "dash"),
}
_LOCAL = ("this-machine", "local", "cpu")  # predictions of the machine the sweep ran on


def style_kind(method: str) -> str:
    """The style key of a metric's method string ('estimated; emulated kernels' -> ...)."""
    m = method.lower()
    if "predicted" in m:
        return "predicted"
    if "estimated" in m and "emulated" in m:
        return "estimated; emulated"
    if "emulated" in m:
        return "emulated"
    if "estimated" in m:
        return "estimated"
    return "measured"


def _hover(r: RunRow, extra: str = "") -> str:
    return (
        f"<b>{html.escape(r.recipe)}</b><br>model: {html.escape(r.model)}"
        f"<br>methods: {html.escape(', '.join(recipe_methods(r.recipe)))}"
        f"<br>workload: {html.escape(r.workload or '-')}<br>run: {r.key[:12]}{extra}"
    )


def _err(ms: list[Metric | None], axis: str) -> dict[str, Any] | None:
    if not any(m is not None and m.lo is not None and m.hi is not None for m in ms):
        return None
    plus = [(m.hi - m.value) if m and m.hi is not None else 0 for m in ms]
    minus = [(m.value - m.lo) if m and m.lo is not None else 0 for m in ms]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "thickness": 1}


def _quality_figure(
    data: ReportData, x_name: str, x_title: str, recommended: dict[str, str] | None = None
) -> Any | None:
    """Perplexity (y) against ``x_name`` (x): one trace per (hardware, method), the Pareto
    front of each (model, workload) on this machine, and the recommended runs starred."""
    import plotly.graph_objects as go

    groups: dict[tuple[str, str], list[tuple[RunRow, Metric, Metric]]] = defaultdict(list)
    for r in data.done:
        ppl = r.metric("perplexity")
        if ppl is None or ppl.value is None:
            continue
        for m in r.metrics:
            if m.name != x_name or m.value is None:
                continue
            kind = style_kind(m.method)
            if x_name == "bits_per_weight" and kernel_method(r.manifest, r.bench) == "emulated":
                kind = "emulated"  # the format has no real kernel here: its run was emulated
            groups[(m.hardware, kind)].append((r, m, ppl))
    if not groups:
        return None
    fig = go.Figure()
    for (hw, kind), pts in sorted(groups.items()):
        symbol, _ = STYLES[kind]
        where = "this machine" if hw == "" else hw
        fig.add_trace(
            go.Scatter(
                x=[m.value for _, m, _ in pts],
                y=[p.value for _, _, p in pts],
                error_x=_err([m for _, m, _ in pts], "x"),
                error_y=_err([p for _, _, p in pts], "y"),
                mode="markers",
                name=f"{where} · {kind}",
                marker={"symbol": symbol, "size": 11, "line": {"width": 2}},
                text=[_hover(r, f"<br>{x_title}: {m.value:.4g} ({m.method})") for r, m, _ in pts],
                hovertemplate="%{text}<br>perplexity: %{y:.4g}<extra></extra>",
            )
        )
    fronts = _fronts(data, x_name)
    for (model, workload), front in sorted(fronts.items(), key=lambda kv: str(kv[0])):
        front.sort()
        group = model + (f" · {workload}" if workload and len(fronts) > 1 else "")
        fig.add_trace(
            go.Scatter(
                x=[x for x, _, _ in front],
                y=[y for _, y, _ in front],
                mode="lines+markers",
                name="Pareto front (this machine)" + (f" · {group}" if len(fronts) > 1 else ""),
                line={"width": 6, "color": "rgba(255,160,0,0.45)", "shape": "hv"},
                marker={"size": 18, "color": "rgba(255,160,0,0.35)"},
                text=[label for _, _, label in front],
                hovertemplate="Pareto: %{text}<extra></extra>",
            )
        )
    stars = [
        (r, m, ppl)
        for (hw, _), pts in groups.items()
        if hw == ""
        for r, m, ppl in pts
        if r.key in (recommended or {})
    ]
    if stars:
        fig.add_trace(_star([m.value for _, m, _ in stars], [p.value for _, _, p in stars],
                            [r for r, _, _ in stars], recommended or {}))  # fmt: skip
    fig.update_layout(
        xaxis_title=x_title, yaxis_title="perplexity (WikiText-2 test)", height=480,
        legend={"title": {"text": "where · method"}}, margin={"t": 30},
    )  # fmt: skip
    return fig


STAR = {"symbol": "star", "size": 22, "color": "rgba(220,20,60,0.9)",
        "line": {"width": 1, "color": "black"}}  # fmt: skip


def _star(xs: list[Any], ys: list[Any], runs: list[RunRow], why: dict[str, str]) -> Any:
    """The trace that marks the recommended runs (★) in a scatter plot."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=xs, y=ys, mode="markers", name="★ recommended", marker=STAR,
        text=[_hover(r, f"<br>recommended: {html.escape(why.get(r.key, ''))}") for r in runs],
        hovertemplate="%{text}<extra></extra>",
    )  # fmt: skip


def _fronts(
    data: ReportData, x_name: str
) -> dict[tuple[str, str | None], list[tuple[float, float, str]]]:
    """This machine's Pareto front of (x, perplexity), both minimised, per (model, workload)."""
    figure = {"j_per_token": "energy", "bits_per_weight": "bits"}.get(x_name, x_name)
    out = {}
    for group, front in pareto_fronts(candidates(data.done), ["ppl", figure]).items():
        pts = [(c.value(x_name), c.value("perplexity"), c.label) for c in front]
        pts = [(x, y, lab) for x, y, lab in pts if x is not None and y is not None]
        if pts:
            out[group] = pts
    return out


LAYER_FIELDS = (
    ("bits_per_weight", "bits/weight per layer", "bits"),
    ("sqnr_db", "weight SQNR per layer (dB)", "dB"),
    ("sensitivity", "sensitivity per layer", ""),
)


# A layer kind's place inside a decoder block, by the last part of its name: the store keeps JSON
# with sorted keys, so the manifest's own order is lost and is rebuilt from the names.
_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "o_proj", "out_proj",
               "dense", "gate_proj", "up_proj", "gate_up_proj", "fc1", "down_proj", "fc2")  # fmt: skip


def _kind_rank(kind: str) -> tuple[int, int, str]:
    part = kind.rsplit(".", 1)[-1]
    attn = 0 if "attn" in kind or "attention" in kind else 1
    return (attn, _KIND_ORDER.index(part) if part in _KIND_ORDER else len(_KIND_ORDER), kind)


def layer_grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[str, str]]]:
    """(block labels in order, layer kinds in model order, name -> (block, kind)).

    ``model.layers.3.self_attn.q_proj`` is block ``3``, kind ``self_attn.q_proj``; a layer
    outside the decoder blocks (``lm_head``) is block ``other``. Blocks are sorted numerically;
    kinds in a block's order (attention q, k, v, o, then the MLP's gate, up, down; others
    after them by name), the layers outside the blocks last."""
    import re

    where: dict[str, tuple[str, str]] = {}
    for n in names:
        m = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.+)$", n)
        where[n] = (m.group(1), m.group(2)) if m else ("other", n)
    blocks = sorted({b for b, _ in where.values() if b != "other"}, key=int)
    outside = sorted({k for b, k in where.values() if b == "other"})
    if outside:
        blocks.append("other")
    inside = sorted({k for b, k in where.values() if b != "other"}, key=_kind_rank)
    return blocks, inside + outside, where


def _heatmap(values: dict[str, float], text: dict[str, str], title: str, unit: str,
             name: str, visible: bool) -> Any:  # fmt: skip
    """One run's per-layer figure as a heatmap: decoder block (x) × layer kind (y)."""
    import plotly.graph_objects as go

    blocks, kinds, where = layer_grid(list(values))
    z: list[list[float | None]] = [[None] * len(blocks) for _ in kinds]
    t: list[list[str]] = [[""] * len(blocks) for _ in kinds]
    for n, v in values.items():
        b, k = where[n]
        z[kinds.index(k)][blocks.index(b)] = v
        t[kinds.index(k)][blocks.index(b)] = f"{n}<br>{text.get(n, '')}"
    return go.Heatmap(
        x=blocks, y=kinds, z=z, text=t, name=name, visible=visible, colorscale="Viridis",
        colorbar={"title": {"text": unit}}, xgap=1, ygap=1,
        hovertemplate="%{text}<br>%{z:.4g} " + unit + "<extra>" + html.escape(name) + "</extra>",
    )  # fmt: skip


def _run_menu(fig: Any, labels: list[str], chosen: int) -> None:
    """A menu that shows one run's heatmap at a time (the recommended one first)."""
    n = len(labels)
    buttons = [
        {"label": lab, "method": "update", "args": [{"visible": [j == i for j in range(n)]}]}
        for i, lab in enumerate(labels)
    ]
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "active": chosen, "x": 0, "xanchor": "left", "y": 1.18,
                      "yanchor": "top", "direction": "down", "showactive": True}]
    )  # fmt: skip


def _layer_figures(
    data: ReportData, recommended: dict[str, str] | None = None
) -> tuple[list[tuple[str, Any]], str]:
    """Per-layer bits/weight and weight SQNR (and sensitivity if recorded) as heatmaps of
    decoder block × layer kind, one run at a time (★ = recommended); a per-format table."""
    import plotly.graph_objects as go

    recommended = recommended or {}
    figs: list[tuple[str, Any]] = []
    per_format: dict[str, dict[str, Any]] = {}
    for field, title, unit in LAYER_FIELDS:
        fig = go.Figure()
        labels: list[str] = []
        chosen = 0
        sources: list[tuple[RunRow, str, dict[str, float], dict[str, str]]] = []
        for r in data.done:
            layers = (r.manifest or {}).get("layers") or {}
            vals = {n: float(v[field]) for n, v in layers.items()
                    if isinstance(v, dict) and v.get(field) is not None}  # fmt: skip
            if vals:
                emulated = any(_layer_path(r.manifest, n) == "emulated" for n in vals)
                text = {n: str(layers[n].get("format") or layers[n].get("method") or "")
                        for n in vals}  # fmt: skip
                sources.append((r, r.recipe + (" · emulated" if emulated else ""), vals, text))
        if field == "sqnr_db":  # a deviation eval's output SQNR per module, against the reference
            for r in data.done:
                for task, ev in (r.eval or {}).items():
                    vals = {
                        str(x["name"]): float(x["sqnr_db"])
                        for x in (ev.get("result") or {}).get("layers") or []
                        if isinstance(x, dict) and x.get("sqnr_db") is not None
                    }
                    if vals:
                        label = f"{r.recipe} · {task}: output SQNR (upstream error included)"
                        sources.append((r, label, vals, {}))
        for r, label, _vals, _text in sources:
            if r.key in recommended and not any(lab.startswith("★") for lab in labels):
                chosen = len(labels)
                label = "★ " + label
            labels.append(f"{label} · {r.model}" if len({x[0].model for x in sources}) > 1
                          else label)  # fmt: skip
        for i, (_r, _label, vals, text) in enumerate(sources):
            fig.add_trace(_heatmap(vals, text, title, unit, labels[i], i == chosen))
        if fig.data:
            if len(labels) > 1:
                _run_menu(fig, labels, chosen)
            fig.update_layout(
                xaxis={"title": "decoder block", "type": "category"},
                yaxis={"title": "layer", "type": "category", "autorange": "reversed"},
                height=max(320, 60 + 34 * len(fig.data[chosen].y)), margin={"t": 70},
            )  # fmt: skip
            figs.append((title, fig))
    for r in data.done:
        for name, v in ((r.manifest or {}).get("layers") or {}).items():
            if not isinstance(v, dict) or not v.get("format"):
                continue
            f = per_format.setdefault(
                str(v["format"]), {"layers": 0, "bits": [], "sqnr": [], "paths": set()}
            )
            f["layers"] += 1
            if v.get("bits_per_weight") is not None:
                f["bits"].append(float(v["bits_per_weight"]))
            if v.get("sqnr_db") is not None:
                f["sqnr"].append(float(v["sqnr_db"]))
            path = _layer_path(r.manifest, name)
            if path is not None:
                f["paths"].add(path)
    rows = [
        [name, f["layers"], _mean(f["bits"]), _mean(f["sqnr"]), ", ".join(sorted(f["paths"]))]
        for name, f in sorted(per_format.items())
    ]
    table = _table(["format", "layers", "mean bits/weight", "mean SQNR (dB)", "kernels"], rows)
    return figs, table if rows else ""


def _layer_path(manifest: dict[str, Any] | None, name: str) -> str | None:
    """What a layer ran in the run's timed forwards, as the bench recorded it: its kernel path
    (``kernel:cpu-int4/bf16``) or ``emulated``; from the run's path counts when every layer took
    the same path; else unknown (the manifest's per-layer ``emulated`` is the format lab's flag,
    true of every format, and says nothing about kernels)."""
    m = manifest or {}
    paths = m.get("layer_paths") or {}
    if name in paths:
        return str(paths[name])
    counts = m.get("linear_paths") or {}
    return str(next(iter(counts))) if len(counts) == 1 else None


def _mean(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.4g}" if xs else "-"


def _power(p: Any) -> list[float]:
    """A timeline's total power: a list, or {domain: list} summed over domains."""
    if isinstance(p, dict):
        cols = [v for v in p.values() if isinstance(v, list)]
        return [sum(x) for x in zip(*cols, strict=False)] if cols else []
    return list(p or [])


def _timeline_figure(data: ReportData, recommended: dict[str, str] | None = None) -> Any | None:
    """Power of each bench, prefill then decode; the recommended run's lines are ★ and wide."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in data.done:
        star = r.key in (recommended or {})
        rows = (r.bench or {}).get("rows") or []
        if not rows:
            continue
        offset = 0.0
        for phase, width in (("prefill", 3), ("decode", 1.5)):
            e = rows[0].get(f"{phase}_energy") or {}
            tl = e.get("timeline") or {}
            t, p = list(tl.get("t_s") or []), _power(tl.get("power_w"))
            if not t or not p:
                continue
            kind = style_kind(str(e.get("method") or "estimated"))
            # t_s[i] ends interval i (average power p[i]): steps from the window's start.
            n = min(len(t), len(p))
            fig.add_trace(
                go.Scatter(
                    x=[offset + x for x in [0.0, *t[:n]]],
                    y=[*p[:n], p[n - 1]],
                    mode="lines+markers" if n < 5 else "lines",
                    name=("★ recommended · " if star else "") + f"{r.recipe} · {phase} · {kind}",
                    line={
                        "dash": STYLES[kind][1],
                        "width": width * (2.5 if star else 1),
                        "shape": "hv",
                    },
                    hovertemplate=f"{html.escape(r.recipe)} {phase}<br>%{{x:.3g}} s: "
                    "%{y:.3g} W<extra></extra>",
                )
            )
            offset += t[-1]
    if not fig.data:
        return None
    fig.update_layout(
        xaxis_title="time from the start of prefill (s)", yaxis_title="power (W)", height=420,
        margin={"t": 30},
    )  # fmt: skip
    return fig


def _predicted_figure(data: ReportData, recommended: dict[str, str] | None = None) -> Any | None:
    import plotly.graph_objects as go

    fig = go.Figure()
    lo_hi: list[float] = []
    stars: tuple[list[float], list[float], list[RunRow]] = ([], [], [])
    for name, unit in (("tpot_ms", "ms"), ("ttft_ms", "ms"), ("j_per_token", "J/tok")):
        xs, ys, texts = [], [], []
        for r in data.done:
            meas = r.metric(name)
            pred = next((r.metric(name, hw) for hw in _LOCAL if r.metric(name, hw)), None)
            if meas is None or pred is None or meas.value is None or pred.value is None:
                continue
            xs.append(meas.value)
            ys.append(pred.value)
            texts.append(_hover(r, f"<br>measured: {meas.method}"))
            if r.key in (recommended or {}):
                stars[0].append(meas.value)
                stars[1].append(pred.value)
                stars[2].append(r)
        if xs:
            lo_hi += xs + ys
            fig.add_trace(
                go.Scatter(
                    x=xs, y=ys, mode="markers", name=f"{name} ({unit}) · predicted",
                    marker={"symbol": STYLES["predicted"][0], "size": 11, "line": {"width": 2}},
                    text=texts,
                    hovertemplate="%{text}<br>measured %{x:.4g}, predicted %{y:.4g}<extra></extra>",
                )
            )  # fmt: skip
    if not fig.data:
        return None
    if stars[0]:
        fig.add_trace(_star(*stars, recommended or {}))
    lo, hi = min(lo_hi), max(lo_hi)
    fig.add_trace(
        go.Scatter(
            x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured",
            line={"dash": "dash", "color": "grey"}, hoverinfo="skip",
        )
    )  # fmt: skip
    fig.update_layout(
        xaxis={"title": "measured on this machine", "type": "log"},
        yaxis={"title": "predicted for this machine", "type": "log"},
        height=440, margin={"t": 30},
    )  # fmt: skip
    return fig


def _table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _provenance(data: ReportData) -> str:
    rows = []
    machines: dict[str, dict[str, Any]] = {}
    for r in data.runs:
        d = data.dates.get(r.key, {})
        versions = ", ".join(f"{k} {v}" for k, v in sorted((r.versions or {}).items()))
        energy = r.metric("j_per_token")
        rows.append(
            [r.model, r.recipe, ", ".join(recipe_methods(r.recipe)), r.workload or "-", r.status,
             r.key[:16], energy.method if energy else "-", versions, d.get("host"),
             d.get("started_at"), d.get("finished_at"), r.error or ""]
        )  # fmt: skip
        machine = (r.bench or {}).get("machine")
        if isinstance(machine, dict) and machine:
            machines[json.dumps(machine, sort_keys=True, default=str)] = machine
    head = ["model", "recipe", "methods", "workload", "status", "config hash", "energy method",
            "versions", "host", "started (UTC)", "finished (UTC)", "error"]  # fmt: skip
    out = _table(head, rows)
    meta = [[k, v] for k, v in sorted(data.meta.items())] + [["store", data.path]]
    out += "<h3>Store</h3>" + _table(["field", "value"], meta)
    for m in machines.values():
        flat = [[k, v if isinstance(v, str | int | float) else json.dumps(v, default=str)]
                for k, v in sorted(m.items())]  # fmt: skip
        out += "<h3>Hardware (from the bench)</h3>" + _table(["field", "value"], flat)
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;
padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
#joules-errors{color:#b00;white-space:pre-wrap}.note{color:#666}.key span{margin-right:1.5em}
"""
_ONERROR = """
// Any script error is written into #joules-errors (kept until the node exists: plotly.js is
// parsed in <head>, before <body>); the browser test reads that node.
var joulesErrors = [];
function joulesError(text) {
  joulesErrors.push(text);
  var n = document.getElementById('joules-errors');
  if (n) { n.textContent = joulesErrors.join('\\n'); }
}
window.onerror = function (msg, src, line, col) {
  joulesError(msg + ' (' + src + ':' + line + ':' + col + ')');
};
window.addEventListener('unhandledrejection', function (e) {
  joulesError('unhandled promise rejection: ' + e.reason);
});
document.addEventListener('DOMContentLoaded', function () {
  if (joulesErrors.length) { joulesError('(' + joulesErrors.length + ' errors before load)'); }
});
"""


def recommended_runs(
    data: ReportData, constraints: Constraints | None = None, objective: str = "energy"
) -> dict[str, str]:
    """The run :func:`joules.sweep.analyze.recommend` chooses for each workload of the store
    (least ``objective`` under ``constraints``; least model bytes where no run has the
    objective's figure), as ``{run key: why}``."""
    constraints = constraints or Constraints()
    out: dict[str, str] = {}
    rule = "; ".join(constraints.describe()) or "no constraint"
    for w in sorted({r.workload for r in data.done}, key=str):
        runs = [r for r in data.done if r.workload == w]
        for obj in dict.fromkeys((objective, "bytes")):
            try:
                rec = recommend(runs, constraints, obj, None, w, None)
            except ConfigError:
                continue
            if rec.chosen is not None:
                out[rec.chosen.key] = f"least {rec.metric} with {rule}" + (
                    f" (workload {w})" if w else ""
                )
            break
    return out


def render_html(
    data: ReportData, constraints: Constraints | None = None, objective: str = "energy"
) -> str:
    """The report of ``data`` as one HTML string (plotly.js inlined); the run
    :func:`recommended_runs` chooses is marked ★ in every plot."""
    import plotly
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections: list[str] = []
    n = 0
    rec = recommended_runs(data, constraints, objective)

    def plot(title: str, fig: Any | None, missing: str, extra: str = "") -> None:
        nonlocal n
        body = extra
        if fig is not None:
            n += 1
            div = pio.to_html(
                fig, include_plotlyjs=False, full_html=False, div_id=f"plot{n}",
                config={"displaylogo": False, "responsive": True},
            )  # fmt: skip
            body = f'<div class="joules-plot">{div}</div>' + extra
        elif not extra:
            body = f'<p class="note">{html.escape(missing)}</p>'
        sections.append(f"<section><h2>{html.escape(title)}</h2>{body}</section>")

    plot("Perplexity vs energy per token", _quality_figure(data, "j_per_token", "J/token", rec),
         "No run has both a perplexity and a J/token yet.")  # fmt: skip
    plot("Perplexity vs bits per weight",
         _quality_figure(data, "bits_per_weight", "bits/weight", rec),
         "No run has both a perplexity and bits/weight yet.")  # fmt: skip
    layer_figs, fmt_table = _layer_figures(data, rec)
    for i, (title, fig) in enumerate(layer_figs):
        plot(f"Per layer: {title}", fig, "", fmt_table if i == 0 else "")
    if not layer_figs:
        plot("Per layer and per format", None, "The store's manifests record no layers.")
    plot("Power timeline: prefill then decode", _timeline_figure(data, rec),
         "No bench in the store recorded a power timeline.")  # fmt: skip
    plot("Predicted vs measured (this machine)", _predicted_figure(data, rec),
         "No run has both a measurement and a prediction for this machine.")  # fmt: skip
    sections.append(f"<section><h2>Provenance</h2>{_provenance(data)}</section>")
    n_failed = sum(r.status == "failed" for r in data.runs)
    glyphs = {"circle": "●", "circle-open": "○", "diamond": "◆", "diamond-open": "◇",
              "triangle-up-open": "△"}  # fmt: skip
    key = "".join(
        f"<span>{glyphs.get(s, s)} {html.escape(k)} (line: {d})</span>"
        for k, (s, d) in STYLES.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>joules report</title>
<style>{_CSS}</style><script>{_ONERROR}</script>
<script>{get_plotlyjs()}</script></head>
<body><pre id="joules-errors"></pre>
<h1>joules report</h1>
<p>{len(data.done)} finished runs, {n_failed} failed, from <code>{html.escape(data.path)}</code>
(plotly {plotly.__version__}). Perplexity is measured; energy without hardware counters is
<b>estimated</b>; a format without a real kernel here runs <b>emulated</b>; figures for other
hardware are <b>predicted</b>.</p>
<p class="key">{key}</p>
{_recommended_note(data, rec)}
{"".join(sections)}
</body></html>
"""


def _recommended_note(data: ReportData, rec: dict[str, str]) -> str:
    if not rec:
        return (
            '<p class="note">No run could be recommended (see <code>joules recommend</code>).</p>'
        )
    items = "".join(
        f"<li><b>{html.escape(r.model)} · {html.escape(r.recipe)}</b> (run {r.key[:12]}): "
        f"{html.escape(rec[r.key])}</li>"
        for r in data.done
        if r.key in rec
    )
    return f'<p id="joules-recommended">★ recommended, marked in every plot:</p><ul>{items}</ul>'


def render_report(
    store_path: str | Path,
    out_path: str | Path,
    constraints: Constraints | None = None,
    objective: str = "energy",
) -> Path:
    """Write the HTML report of the store at ``store_path`` to ``out_path``; returns its path.
    ``constraints`` and ``objective`` choose the run marked ★ (as ``joules recommend``)."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise ConfigError(f"output {str(out)!r}: directory {str(out.parent)!r} does not exist")
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ConfigError("the report needs plotly: `pip install plotly`") from None
    atomic_write_text(out, render_html(load_report_data(store_path), constraints, objective))
    return out
