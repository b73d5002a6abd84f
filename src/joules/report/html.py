"""The HTML report of a sweep store: one self-contained file (plotly's JavaScript inlined).

    >>> from joules.report import render_report          # doctest: +SKIP
    >>> render_report("joules.db", "report.html")         # doctest: +SKIP
    PosixPath('report.html')

Sections, top-down: the answer (:mod:`joules.report.answer`: the file to ship, by
``recommend`` with the given constraints and objective per workload, beside the runner-up,
the llama.cpp peer of the same size and the baseline, and why); one table of every candidate,
sorted by clicking a header (inline script, no dependency); mean KLD (perplexity where the store
has no KLD) vs J/token and vs bits/weight, on a log x axis so a 32-bit baseline does not squash
the rest, every point named on hover and by a text label where one fits, the Pareto front of
each model and workload highlighted (never one across them); mean KLD vs GGUF file size, one
curve per way of making files (:mod:`joules.report.curve`); per-layer bits and weight SQNR (a
heatmap of decoder block × layer kind per run, in model order, one run at a time from a menu);
the prefill/decode power timeline of the runs ticked in its picker (default: recommended,
runner-up, baseline); predicted vs measured; and a provenance table. The recommended run is
marked ★ in every plot. Each figure's *method* sets its marker and line style: measured (filled
circle, solid), estimated (open circle, dotted), emulated kernels (diamond, dash-dot), predicted
(open triangle, dashed). Opening the file needs no network; a script error is written into
``#joules-errors`` (the browser test reads it).
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.report.answer import (
    LABELS,
    Answer,
    answers,
    figure,
    format_interval,
    format_metric,
    gguf_of,
    method_tag,
    quality_metric,
    role_of,
    runtime_of,
    short_label,
)
from joules.report.curve import runs_points, size_figure
from joules.report.data import ReportData, load_report_data, recipe_methods
from joules.serialize import atomic_write_text
from joules.sweep.analyze import Constraints, candidates, human_bytes, pareto_fronts
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
    data: ReportData,
    x_name: str,
    x_title: str,
    recommended: dict[str, str] | None = None,
    y_name: str = "perplexity",
    first: Sequence[str] = (),
) -> Any | None:
    """``y_name`` (mean KLD, else perplexity) against ``x_name`` on a log x axis (an fp32
    baseline at 32 bits/weight, or its J/token, would squash the rest): one trace per (hardware,
    method, role), the Pareto front of each (model, workload) on this machine, and the
    recommended runs starred. Every point names its recipe on hover; points of this machine
    carry it as a text label where it does not collide with another (:func:`_place_labels`;
    runs ``first`` and the recommended ones are labelled first). Predictions for this machine
    are left to the predicted-vs-measured plot."""
    import plotly.graph_objects as go

    roles = {role_of(r) for r in data.done}
    groups: dict[tuple[str, str, str], list[tuple[RunRow, Metric, Metric]]] = defaultdict(list)
    for r in data.done:
        q = figure(r, y_name)
        if q is None:
            continue
        for m in r.metrics:
            if m.name != x_name or m.value is None or m.value <= 0 or m.hardware in _LOCAL:
                continue
            kind = style_kind(m.method)
            if x_name == "bits_per_weight" and kernel_method(r.manifest, r.bench) == "emulated":
                kind = "emulated"  # the format has no real kernel here: its run was emulated
            groups[(m.hardware, kind, role_of(r) if len(roles) > 1 else "")].append((r, m, q))
    if not groups:
        return None
    order = [*first, *(recommended or {})]
    labels = _place_labels(
        [(r.key, m.value, q.value, short_label(r.recipe))
         for (hw, _, _), pts in groups.items() if hw == "" for r, m, q in pts],
        order,
    )  # fmt: skip
    y_title = QUALITY_TITLES[y_name]
    fig = go.Figure()
    for (hw, kind, role), pts in sorted(groups.items()):
        symbol, _ = STYLES[kind]
        where = "this machine" if hw == "" else hw
        placed = [labels.get(r.key) if hw == "" else None for r, _, _ in pts]
        fig.add_trace(
            go.Scatter(
                x=[m.value for _, m, _ in pts],
                y=[q.value for _, _, q in pts],
                error_x=_err([m for _, m, _ in pts], "x"),
                error_y=_err([q for _, _, q in pts], "y"),
                mode="markers+text" if any(placed) else "markers",
                name=f"{where} · {kind}" + (f" · {role}" if role else ""),
                marker={"symbol": symbol, "size": 11, "line": {"width": 2}},
                text=[p[1] if p else "" for p in placed],
                textposition=[p[0] if p else "middle right" for p in placed],
                textfont={"size": 10},
                hovertext=[
                    _hover(r, f"<br>{x_title}: {m.value:.4g} ({m.method})") for r, m, _ in pts
                ],
                hovertemplate=f"%{{hovertext}}<br>{y_title}: %{{y:.4g}}<extra></extra>",
            )
        )
    fronts = _fronts(data, x_name, y_name)
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
        (r, m, q)
        for (hw, _, _), pts in groups.items()
        if hw == ""
        for r, m, q in pts
        if r.key in (recommended or {})
    ]
    if stars:
        fig.add_trace(_star([m.value for _, m, _ in stars], [q.value for _, _, q in stars],
                            [r for r, _, _ in stars], recommended or {}))  # fmt: skip
    fig.update_layout(
        xaxis={"title": f"{x_title} (log scale)", "type": "log"}, yaxis_title=y_title,
        height=560, margin={"t": 30},
        legend={"title": {"text": "where · method"}, "orientation": "h", "y": -0.18,
                "yanchor": "top"},
    )  # fmt: skip
    return fig


# Label placement: the plot area in pixels (figure 1200 × 560 less margins and the legend below)
# and a label's size at font 10; positions tried in this order.
_PLOT_W, _PLOT_H, _CHAR_W, _LINE_H = 1060.0, 340.0, 5.6, 12.0
_POSITIONS = ("middle right", "middle left", "top center", "bottom center")


def _place_labels(
    points: list[tuple[str, float, float, str]], first: Sequence[str] = ()
) -> dict[str, tuple[str, str]]:
    """{key: (textposition, label)} for the points whose label fits without covering another
    label or marker (greedy: the runs in ``first``, then by label length, shortest first); a
    point left out still names its recipe on hover. x is on a log axis, y linear."""
    if not points:
        return {}
    lx = [math.log10(x) for _, x, _, _ in points]
    ys = [y for _, _, y, _ in points]
    x0, x1 = min(lx), max(lx)
    y0, y1 = min(ys), max(ys)
    padx, pady = 0.06 * ((x1 - x0) or 1.0), 0.06 * ((y1 - y0) or 1.0)
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def px(x: float, y: float) -> tuple[float, float]:
        return ((math.log10(x) - x0) / (x1 - x0) * _PLOT_W, (y1 - y) / (y1 - y0) * _PLOT_H)

    boxes = [(cx - 6, cy - 6, cx + 6, cy + 6) for cx, cy in (px(x, y) for _, x, y, _ in points)]
    rank = {k: i for i, k in enumerate(dict.fromkeys(first))}
    out: dict[str, tuple[str, str]] = {}
    for key, x, y, label in sorted(points, key=lambda p: (rank.get(p[0], len(rank)), len(p[3]))):
        if key in out:
            continue
        cx, cy = px(x, y)
        w, h = _CHAR_W * len(label), _LINE_H
        for pos in _POSITIONS:
            box = {
                "middle right": (cx + 8, cy - h / 2, cx + 8 + w, cy + h / 2),
                "middle left": (cx - 8 - w, cy - h / 2, cx - 8, cy + h / 2),
                "top center": (cx - w / 2, cy - 8 - h, cx + w / 2, cy - 8),
                "bottom center": (cx - w / 2, cy + 8, cx + w / 2, cy + 8 + h),
            }[pos]
            inside = box[0] >= -20 and box[2] <= _PLOT_W + 20 and box[1] >= -5
            if inside and box[3] <= _PLOT_H + 5 and not any(_overlap(box, b) for b in boxes):
                out[key] = (pos, label)
                boxes.append(box)
                break
    return out


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


QUALITY_TITLES = {
    "kld_mean": "mean KL divergence from the base (nat)",
    "perplexity": "perplexity (WikiText-2 test)",
}


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
    data: ReportData, x_name: str, y_name: str = "perplexity"
) -> dict[tuple[str, str | None], list[tuple[float, float, str]]]:
    """This machine's Pareto front of (x, quality), both minimised, per (model, workload)."""
    figure_of = {"j_per_token": "energy", "bits_per_weight": "bits"}.get(x_name, x_name)
    quality = "kld" if y_name == "kld_mean" else "ppl"
    out = {}
    for group, front in pareto_fronts(candidates(data.done), [quality, figure_of]).items():
        pts = [(c.value(x_name), c.value(y_name), c.label) for c in front]
        pts = [(x, y, lab) for x, y, lab in pts if x is not None and y is not None and x > 0]
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


def _timeline_figure(
    data: ReportData,
    recommended: dict[str, str] | None = None,
    shown: set[str] | None = None,
) -> Any | None:
    """Power of each bench, prefill then decode; the recommended run's lines are ★ and wide.
    Each run's traces share its key as ``legendgroup``; only the runs in ``shown`` are visible
    (None: all), the page's run picker shows the others."""
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
                    legendgroup=r.key,
                    visible=shown is None or r.key in shown,
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


def _picker(fig: Any, div_id: str, labels: dict[str, str]) -> str:
    """Checkboxes, one per run of a figure whose traces carry the run key as ``legendgroup``:
    ticking one shows that run's traces (inline script below, ``Plotly.restyle``)."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(fig.data):
        groups.setdefault(str(t.legendgroup), []).append(i)
    boxes = "".join(
        f'<label><input type="checkbox" data-run="{html.escape(key)}" '
        f'data-traces="{",".join(map(str, idx))}"'
        f"{' checked' if fig.data[idx[0]].visible is True else ''}> "
        f"{html.escape(labels.get(key, key[:12]))}</label>"
        for key, idx in groups.items()
    )
    return (
        f'<div class="joules-pick" data-plot="{div_id}"><b>runs shown</b> '
        f'<span class="note">(tick to compare; default: the recommended run, the runner-up and '
        f"the baseline)</span><br>{boxes}</div>"
    )


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
        g = gguf_of(r)
        file = f"{g['path']} (sha256 {str(g.get('sha256') or '')[:12]})" if g else "-"
        rows.append(
            [r.model, r.recipe, ", ".join(recipe_methods(r.recipe)), r.workload or "-", r.status,
             r.key[:16], energy.method if energy else "-", file, versions, d.get("host"),
             d.get("started_at"), d.get("finished_at"), r.error or ""]
        )  # fmt: skip
        machine = (r.bench or {}).get("machine")
        if isinstance(machine, dict) and machine:
            machines[json.dumps(machine, sort_keys=True, default=str)] = machine
    head = ["model", "recipe", "methods", "workload", "status", "config hash", "energy method",
            "file", "versions", "host", "started (UTC)", "finished (UTC)", "error"]  # fmt: skip
    out = _table(head, rows)
    meta = [[k, v] for k, v in sorted(data.meta.items())] + [["store", data.path]]
    out += "<h3>Store</h3>" + _table(["field", "value"], meta)
    for m in machines.values():
        flat = [[k, v if isinstance(v, str | int | float) else json.dumps(v, default=str)]
                for k, v in sorted(m.items())]  # fmt: skip
        out += "<h3>Hardware (from the bench)</h3>" + _table(["field", "value"], flat)
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1240px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;
padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}
#joules-errors{color:#b00;white-space:pre-wrap}.note{color:#666}.key span{margin-right:1.5em}
.answer{border:2px solid #2a7;border-radius:6px;padding:.2em 1.2em 1em;margin:1em 0;
background:#f6fcf8}.answer.research{border-color:#999;background:#fafafa}
.answer h2{margin:.5em 0 .2em}.answer .file{font-size:14px}.answer ul{margin:.3em 0}
table.cmp td:first-child{font-weight:600}table.cmp td,table.cmp th{font-size:13px;padding:4px 10px}
table.cmp .chosen{background:#e3f6ea}
table.joules-sortable th{cursor:pointer;user-select:none;vertical-align:bottom}
table.joules-sortable th[aria-sort=ascending]::after{content:" ▲"}
table.joules-sortable th[aria-sort=descending]::after{content:" ▼"}
table.joules-sortable td.num{text-align:right;white-space:nowrap}
tr.chosen td{background:#e3f6ea}tr.research td{color:#555}td.recipe{white-space:nowrap}
.m{color:#a60;font-size:10px;margin-left:3px}.ci{color:#777;font-size:10px}.joules-pick label{margin-right:1.2em;
font-size:12px;white-space:nowrap}
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
# At the end of <body>: click a header of a sortable table to sort by it (again: reverse; cells
# sort by their data-v, numbers as numbers, empty cells last either way); tick a run in a
# picker to show its traces.
_INTERACT = """
function joulesSort(th) {
  var table = th.closest('table'), body = table.tBodies[0];
  var col = Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc = th.getAttribute('aria-sort') !== 'ascending';
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
    if (x === '' || x === null) { return (y === '' || y === null) ? 0 : 1; }
    if (y === '' || y === null) { return -1; }
    var nx = Number(x), ny = Number(y), c;  // Number('91.7 MB') is NaN: text compares as text
    if (!isNaN(nx) && !isNaN(ny)) { c = nx - ny; }
    else { c = x.localeCompare(y); }
    return asc ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  Array.prototype.forEach.call(th.parentNode.children, function (h) {
    h.removeAttribute('aria-sort');
  });
  th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
}
document.querySelectorAll('table.joules-sortable th').forEach(function (th) {
  th.addEventListener('click', function () { joulesSort(th); });
});
document.querySelectorAll('.joules-pick input').forEach(function (box) {
  box.addEventListener('change', function () {
    var div = document.getElementById(box.closest('.joules-pick').getAttribute('data-plot'));
    var idx = box.getAttribute('data-traces').split(',').map(Number);
    Plotly.restyle(div, {visible: box.checked}, idx);
  });
});
"""


def recommended_runs(
    data: ReportData, constraints: Constraints | None = None, objective: str = "energy"
) -> dict[str, str]:
    """The run :func:`joules.sweep.analyze.recommend` chooses for each workload of the store
    (least ``objective`` under ``constraints``; least model bytes where no run has the
    objective's figure), as ``{run key: why}``."""
    return _starred(answers(data, constraints, objective))


def _starred(ans: list[Answer]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in ans:
        if a.chosen is not None:
            rule = "; ".join(a.recommendation.constraints) or "no constraint"
            out[a.chosen.key] = f"least {a.recommendation.metric} with {rule}" + (
                f" (workload {a.workload})" if a.workload else ""
            )
    return out


# The figures of the answer's comparison and of the candidate table: (figure, interval shown).
_CMP_FIGURES = (
    ("model_bytes", False), ("bits_per_weight", False), ("kld_mean", True), ("kld_p99", False),
    ("same_top_pct", False), ("ppl_ratio", True), ("tokens_per_s", False),
    ("j_per_token", True),
)  # fmt: skip


def _cell(name: str, m: Metric | None, interval: bool = True) -> str:
    """A figure as HTML: value, interval, and its method's mark unless measured."""
    if m is None:
        return "–"
    tag = method_tag(m.method)
    mark = f'<span class="m" title="{html.escape(m.method)}">{tag}</span>' if tag else ""
    ci = format_interval(name, m) if interval else ""
    return (
        html.escape(format_metric(name, m, False))
        + mark
        + (f'<br><span class="ci">{html.escape(ci)}</span>' if ci else "")
    )


def _file_line(r: RunRow) -> str:
    g = gguf_of(r)
    if g is None:
        return ""
    sha = str(g.get("sha256") or "")
    types = g.get("types") or {}
    mix = ", ".join(f"{t} ×{n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    return (
        f'<p class="file">file: <code>{html.escape(str(g["path"]))}</code>'
        + (f" · {human_bytes(g['size_bytes'])}" if g.get("size_bytes") else "")
        + (f" · sha256 <code>{html.escape(sha[:16])}…</code>" if sha else "")
        + (f"<br>tensor types: {html.escape(mix)}" if mix else "")
        + "</p>"
    )


def _answer_html(a: Answer, primary: bool, quality: str) -> str:
    """One answer: the file to ship, its figures beside the runner-up, the llama.cpp peer of
    the same size and the baseline, and why."""
    rt = a.runtime or "-"
    where = f"benched through {rt} (workload {a.workload})" if a.workload else "evaluated only"
    r = a.chosen or a.closest
    if r is None:
        return ""
    g = gguf_of(r)
    name = Path(str(g["path"])).name if g else short_label(r.recipe)
    if a.chosen is None:
        title = f"Nothing meets the constraints; closest: {name}"
    elif a.deployable:
        title = f"Ship {name}"
    elif role_of(r) == "eval only":
        title = f"Best by the constraints: {name}"
    else:
        title = f"Best research row ({rt}): {name}"
    role = role_of(r)
    sub = f"{html.escape(r.model)} · <b>{html.escape(r.recipe)}</b> — {role}, {html.escape(where)}"
    if role == "research":
        sub += (
            " — a torch runtime nobody deploys: its speed and energy are not llama.cpp's "
            '(add <code>[bench] runtime = "llamacpp"</code> to measure the file you ship)'
        )
    cols: list[tuple[str, RunRow, str]] = [("★ recommended" if a.chosen else "closest", r, "")]
    if a.runner_up is not None:
        cols.append(("runner-up", a.runner_up, ""))
    gap_note = ""
    if a.peer is not None and a.peer_gap_bytes is not None:
        size = figure(r, "model_bytes")
        pct = 100 * a.peer_gap_bytes / size.value if size and size.value else 0.0
        sign = "+" if a.peer_gap_bytes >= 0 else "−"
        gap_note = f"size gap {sign}{human_bytes(abs(a.peer_gap_bytes))} ({pct:+.1f} %)"
        cols.append(("llama.cpp peer of the same size", a.peer, gap_note))
    if a.baseline is not None and a.baseline.key not in {c[1].key for c in cols}:
        cols.append(("baseline", a.baseline, ""))
    head = (
        "<tr><th>figure</th>"
        + "".join(
            f"<th{' class=chosen' if i == 0 else ''}>{html.escape(t)}<br>"
            f'<span class="note">{html.escape(short_label(c.recipe))}'
            f"{(' · ' + html.escape(n)) if n else ''}</span></th>"
            for i, (t, c, n) in enumerate(cols)
        )
        + "</tr>"
    )
    body = ""
    for fig_name, interval in _CMP_FIGURES:
        ms = [figure(c, fig_name) for _, c, _ in cols]
        if all(m is None for m in ms):
            continue
        body += (
            f"<tr><td>{html.escape(LABELS[fig_name])}</td>"
            + "".join(
                f"<td{' class=chosen' if i == 0 else ''}>{_cell(fig_name, m, interval)}</td>"
                for i, m in enumerate(ms)
            )
            + "</tr>"
        )
    body += (
        "<tr><td>methods</td>"
        + "".join(f"<td>{html.escape(', '.join(_methods(c)))}</td>" for _, c, _ in cols)
        + "</tr>"
    )
    why = "".join(f"<li>{html.escape(x)}</li>" for x in a.why())
    if a.peer is not None:
        vs = _versus(r, a.peer, quality)
        why += (
            f"<li>llama.cpp peer of the same size: {html.escape(short_label(a.peer.recipe))} "
            f"({html.escape(gap_note)}){(': ' + html.escape(vs)) if vs else ''}.</li>"
        )
    elif a.deployable:
        why += "<li>No llama.cpp peer run in the store to set it beside.</li>"
    h = "h2" if primary else "h3"
    cls = "answer" if a.deployable or role != "research" else "answer research"
    return (
        f'<section class="{cls}" data-workload="{html.escape(str(a.workload))}" '
        f'data-chosen="{html.escape(r.key)}"><{h}>{html.escape(title)}</{h}>'
        f"<p>{sub}</p>{_file_line(r)}"
        f'<table class="cmp">{head}{body}</table><p><b>Why</b></p><ul>{why}</ul></section>'
    )


def _versus(r: RunRow, peer: RunRow, quality: str) -> str:
    """'mean KLD 0.0830 vs 0.155; decode tok/s 101 vs 98' (chosen vs peer)."""
    out = []
    for name in (quality if quality == "kld_mean" else "ppl_ratio", "tokens_per_s", "j_per_token"):
        a, b = figure(r, name), figure(peer, name)
        if a is not None and b is not None:
            out.append(
                f"{LABELS[name]} {format_metric(name, a, False)} vs {format_metric(name, b, False)}"
            )
    return "; ".join(out)


def _methods(r: RunRow) -> list[str]:
    return sorted({style_kind(m.method) for m in r.metrics if m.hardware == ""})


_TABLE_COLUMNS = (
    ("model_bytes", "size", False), ("bits_per_weight", "bits/weight", False),
    ("kld_mean", "mean KLD (nat)", True), ("kld_p99", "p99 KLD", False),
    ("ppl_ratio", "perplexity ratio", True), ("tokens_per_s", "decode tok/s", False),
    ("j_per_token", "J/token", True),
)  # fmt: skip


def _candidate_table(data: ReportData, ans: list[Answer]) -> str:
    """Every finished run in one table, sortable by clicking a header; default order: the
    workloads as the answers are (deployable first), then runs meeting the constraints by the
    objective."""
    order = {a.workload: i for i, a in enumerate(ans)}
    checks = {c.key: c for a in ans for c in a.recommendation.candidates}
    objective = {a.workload: a.metric for a in ans}
    marks: dict[str, str] = {}
    for a in ans:
        for r, mark in ((a.baseline, "baseline"), (a.peer, "peer"), (a.runner_up, "runner-up"),
                        (a.chosen, "★ ship" if a.deployable else "★")):  # fmt: skip
            if r is not None:
                marks[r.key] = mark
    cols = [c for c in _TABLE_COLUMNS if any(figure(r, c[0]) for r in data.done)]
    models = {r.model for r in data.done}

    def rank(r: RunRow) -> tuple[int, int, float, str]:
        c = checks.get(r.key)
        v = figure(r, objective.get(r.workload, "j_per_token"))
        return (order.get(r.workload, len(order)), 0 if c is None or c.feasible else 1,
                v.value if v is not None and v.value is not None else math.inf, r.recipe)  # fmt: skip

    head = (
        "<tr><th>mark</th>" + ("<th>model</th>" if len(models) > 1 else "")
        + "<th>recipe</th><th>row</th>"
        + "".join(f'<th data-key="{k}">{html.escape(t)}'
                  + ('<br><span class="ci">[95 %]</span>' if ci else "") + "</th>"
                  for k, t, ci in cols)
        + "<th>methods</th><th>constraints</th></tr>"
    )  # fmt: skip
    rows = []
    for r in sorted(data.done, key=rank):
        c = checks.get(r.key)
        status = "-" if c is None else (
            "met" if c.feasible else ", ".join(
                f"{k.flag.removeprefix('--')}: {k.status}" for k in c.checks if k.status != "met"
            )
        )  # fmt: skip
        if r.synthetic:
            status = f"not ranked: {r.synthetic}"
        role = role_of(r)
        rt = runtime_of(r)
        role_text = f"{role} ({rt})" if role == "research" and rt else role
        mark = marks.get(r.key, "") or ("synthetic" if r.synthetic else "")
        cells = [f'<td data-v="{html.escape(mark)}">{html.escape(mark)}</td>']
        if len(models) > 1:
            cells.append(f'<td data-v="{html.escape(r.model)}">{html.escape(r.model)}</td>')
        cells.append(
            f'<td class="recipe" data-v="{html.escape(r.recipe)}" title="{html.escape(r.recipe)} · run '
            f'{r.key[:12]}">{html.escape(short_label(r.recipe))}</td>'
        )
        cells.append(f'<td data-v="{html.escape(role_text)}">{html.escape(role_text)}</td>')
        for k, _, interval in cols:
            m = figure(r, k)
            v = "" if m is None or m.value is None else repr(float(m.value))
            cells.append(f'<td class="num" data-v="{v}">{_cell(k, m, interval)}</td>')
        methods = ", ".join(_methods(r))
        cells.append(f'<td data-v="{html.escape(methods)}">{html.escape(methods)}</td>')
        cells.append(f'<td data-v="{html.escape(status)}">{html.escape(status)}</td>')
        cls = "chosen" if mark.startswith("★") else ("research" if role == "research" else "")
        rows.append(
            f'<tr data-key="{html.escape(r.key)}"{f" class={cls}" if cls else ""}>'
            + "".join(cells) + "</tr>"
        )  # fmt: skip
    note = (
        '<p class="note">Click a header to sort (again to reverse). Figures are measured on this '
        'machine unless marked <span class="m">est.</span> (estimated energy: no hardware '
        'counter), <span class="m">emul.</span> (emulated kernels) or <span class="m">pred.'
        "</span> (predicted). Intervals are 95 %: paired against the baseline for KLD and the "
        "perplexity ratio, repeats and meter uncertainty for J/token. Deployable rows ran "
        "through llama.cpp; research rows through a torch runtime (eager, compiled)."
        + ("" if any(k == "kld_mean" for k, _, _ in cols) else
           " No run has a KL divergence: quality is the perplexity ratio.")
        + "</p>"
    )  # fmt: skip
    return (
        f'{note}<table id="joules-candidates" class="joules-sortable"><thead>{head}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _timeline_picks(data: ReportData, ans: list[Answer]) -> set[str]:
    """The runs the power timeline shows first: the recommended run, runner-up and baseline of
    the first answer that has benches (else the first three runs with a bench)."""
    benched = [r.key for r in data.done if (r.bench or {}).get("rows")]
    for a in ans:
        picks = {r.key for r in (a.chosen or a.closest, a.runner_up, a.baseline) if r}
        if picks & set(benched):
            return picks & set(benched)
    return set(benched[:3])


def render_html(
    data: ReportData, constraints: Constraints | None = None, objective: str = "energy"
) -> str:
    """The report of ``data`` as one HTML string (plotly.js inlined): the answer (the run
    :func:`joules.report.answer.answers` chooses, per workload), the table of every candidate,
    then the plots, each with the recommended run marked ★."""
    import plotly
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections: list[str] = []
    n = 0
    ans = answers(data, constraints, objective)
    rec = _starred(ans)
    quality = quality_metric(data.done)
    q_word = "KL divergence" if quality == "kld_mean" else "Perplexity"

    def plot(title: str, fig: Any | None, missing: str, extra: str = "",
             before: Any = None) -> None:  # fmt: skip
        nonlocal n
        body = extra
        if fig is not None:
            n += 1
            div = pio.to_html(
                fig, include_plotlyjs=False, full_html=False, div_id=f"plot{n}",
                config={"displaylogo": False, "responsive": True},
            )  # fmt: skip
            pre = before(f"plot{n}") if before else ""
            body = f'{pre}<div class="joules-plot">{div}</div>' + extra
        elif not extra:
            body = f'<p class="note">{html.escape(missing)}</p>'
        sections.append(f"<section><h2>{html.escape(title)}</h2>{body}</section>")

    first = [r.key for a in ans for r in (a.chosen, a.runner_up, a.peer, a.baseline) if r]
    plot(f"{q_word} vs energy per token",
         _quality_figure(data, "j_per_token", "J/token", rec, quality, first),
         f"No run has both a {q_word.lower()} and a J/token yet.")  # fmt: skip
    plot(f"{q_word} vs bits per weight",
         _quality_figure(data, "bits_per_weight", "bits/weight", rec, quality, first),
         f"No run has both a {q_word.lower()} and bits/weight yet.")  # fmt: skip
    size_pts = runs_points(data.done)
    plot("KL divergence vs file size (the GGUF files; the float baseline left out)",
         size_figure(size_pts) if size_pts else None,
         "No run has both a GGUF file and a mean KL divergence yet.")  # fmt: skip
    layer_figs, fmt_table = _layer_figures(data, rec)
    for i, (title, fig) in enumerate(layer_figs):
        plot(f"Per layer: {title}", fig, "", fmt_table if i == 0 else "")
    if not layer_figs:
        plot("Per layer and per format", None, "The store's manifests record no layers.")
    timeline = _timeline_figure(data, rec, _timeline_picks(data, ans))
    labels = {r.key: ("★ " if r.key in rec else "") + short_label(r.recipe)
              + (f" · {runtime_of(r)}" if len({x.workload for x in data.done}) > 1 else "")
              for r in data.done}  # fmt: skip
    plot("Power timeline: prefill then decode", timeline,
         "No bench in the store recorded a power timeline.",
         before=lambda div: _picker(timeline, div, labels))  # fmt: skip
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
    answer = "".join(_answer_html(a, i == 0, quality) for i, a in enumerate(ans) if a.deployable)
    rest = "".join(
        _answer_html(a, not answer and i == 0, quality)
        for i, a in enumerate(x for x in ans if not x.deployable)
    )
    if answer and rest:  # research rows: their own answer, folded under the deployable one
        rest = (
            "<details><summary>Research rows (torch runtimes): their own recommendation"
            f"</summary>{rest}</details>"
        )
    answer += rest
    synthetic = [r for r in data.done if r.synthetic]
    if not answer:
        answer = (
            '<p class="note">No run could be recommended: the store has no finished run with '
            "the figures <code>joules recommend</code> needs"
            + (" on real weights" if synthetic else "")
            + ".</p>"
        )
    if synthetic:
        answer = (
            f'<p class="note" id="joules-synthetic">{len(synthetic)} of {len(data.done)} finished '
            f"runs measured a model with random weights ({html.escape(str(synthetic[0].synthetic))}"
            "): joules ranks none of them; their time and memory figures stand.</p>" + answer
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>joules report</title>
<style>{_CSS}</style><script>{_ONERROR}</script>
<script>{get_plotlyjs()}</script></head>
<body><pre id="joules-errors"></pre>
<h1>joules report: which file to ship</h1>
<div id="joules-answer">{answer}</div>
{_recommended_note(data, rec)}
<section><h2>Every candidate</h2>{_candidate_table(data, ans)}</section>
<p>{len(data.done)} finished runs, {n_failed} failed, from <code>{html.escape(data.path)}</code>
(plotly {plotly.__version__}). Quality is measured; energy without hardware counters is
<b>estimated</b>; a format without a real kernel here runs <b>emulated</b>; figures for other
hardware are <b>predicted</b>. Plot markers and lines by method:</p>
<p class="key">{key}</p>
{"".join(sections)}
<script>{_INTERACT}</script>
</body></html>
"""


def _recommended_note(data: ReportData, rec: dict[str, str]) -> str:
    if not rec:
        return ""
    names = ", ".join(
        f"{html.escape(short_label(r.recipe))}"
        + (f" ({html.escape(runtime_of(r) or '-')})" if len(rec) > 1 else "")
        for r in data.done
        if r.key in rec
    )
    return (
        f'<p id="joules-recommended" class="note">★ in every plot below marks the recommended run'
        f"{'s' if len(rec) > 1 else ''} ({names}).</p>"
    )


def render_report(
    store_path: str | Path,
    out_path: str | Path,
    constraints: Constraints | None = None,
    objective: str = "energy",
) -> Path:
    """Write the HTML report of the store at ``store_path`` to ``out_path``; returns its path.
    ``constraints`` and ``objective`` choose the recommended run (as ``joules recommend``)."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise ConfigError(f"output {str(out)!r}: directory {str(out.parent)!r} does not exist")
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ConfigError("the report needs plotly: `pip install plotly`") from None
    atomic_write_text(out, render_html(load_report_data(store_path), constraints, objective))
    return out
