"""Quality against file size: the GGUF files of a sweep as curves, one per way of making them.

    >>> from joules.report.curve import SizePoint, size_figure
    >>> pts = [SizePoint("llama.cpp + imatrix", 87.6, 0.17, (0.16, 0.18), "Q4_0"),
    ...        SizePoint("joules: file of a target size", 87.5, 0.06, None, "87.5 MiB")]
    >>> fig = size_figure(pts)
    >>> [t.name for t in fig.data]
    ['llama.cpp + imatrix', 'joules: file of a target size']

The deploy question is "the best file of this size": each way of making files (llama.cpp's
presets with and without an importance matrix, joules' files of a target size, joules' files
with a preset's types) is one series of (file size, mean KL divergence from the base) points,
joined in size order, so one curve lying below another at every size is read at a glance. The
float baseline (KL divergence 0 by definition, and several times larger) is left out so it does
not squash the axis. :func:`runs_points` takes a sweep store's runs (the report draws it),
:func:`rows_points` the rows of ``benchmarks/deploy.py``'s JSON (the docs' picture).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from joules.report.answer import figure, gguf_of, is_peer, short_label
from joules.sweep.store import RunRow

PEER = "llama.cpp"
PEER_IMATRIX = "llama.cpp + imatrix"
TARGET = "joules: file of a target size"
JOULES = "joules: a preset's types"
# series order, and how each is drawn (marker symbol, line dash or None for markers only,
# colour): a preset's types copied by several joules methods are points, not a curve
SERIES = {
    PEER: ("square-open", "dot", "#888888"),
    PEER_IMATRIX: ("square", "solid", "#d62728"),
    JOULES: ("circle-open", None, "#1f77b4"),
    TARGET: ("circle", "solid", "#1f77b4"),
}
MIB = 2**20


@dataclass(frozen=True)
class SizePoint:
    """One GGUF file: its series (:data:`SERIES`), size in MiB, mean KLD with its 95 % interval,
    and a label (the recipe, short)."""

    series: str
    size_mib: float
    kld: float
    kld_ci95: tuple[float, float] | None
    label: str


def series_of(recipe: str, peer: bool | None = None) -> str:
    """The series of a recipe: a llama.cpp peer (with or without an imatrix), a joules file of a
    target size (``gguf_mix``), or another joules file."""
    if peer if peer is not None else is_peer(recipe):
        imatrix = "imatrix=true" in recipe.replace(" ", "").lower()
        return PEER_IMATRIX if imatrix else PEER
    return TARGET if "gguf_mix(" in recipe else JOULES


def runs_points(runs: Iterable[RunRow]) -> list[SizePoint]:
    """The points of a store's finished runs that wrote a GGUF file and have a mean KLD (the
    baseline left out)."""
    out = []
    for r in runs:
        g, kld = gguf_of(r), figure(r, "kld_mean")
        if g is None or kld is None or r.recipe.strip() == "baseline" or not g.get("size_bytes"):
            continue
        ci = (kld.lo, kld.hi) if kld.lo is not None and kld.hi is not None else None
        out.append(
            SizePoint(
                series_of(r.recipe), g["size_bytes"] / MIB, kld.value, ci, short_label(r.recipe)
            )
        )
    return out


def rows_points(rows: Iterable[dict[str, Any]]) -> list[SizePoint]:
    """The points of ``benchmarks/deploy.py`` rows (``kind``, ``recipe``, ``row``,
    ``size_bytes``, ``kld_mean`` and its ``kld_mean_ci95``)."""
    out = []
    for r in rows:
        if r.get("kind") == "baseline" or r.get("kld_mean") is None or not r.get("size_bytes"):
            continue
        ci = r.get("kld_mean_ci95")
        out.append(
            SizePoint(
                series_of(r.get("recipe") or "", peer=str(r["kind"]).startswith("peer")),
                r["size_bytes"] / MIB,
                r["kld_mean"],
                (ci[0], ci[1]) if ci else None,
                r["row"],
            )
        )
    return out


def size_figure(points: Sequence[SizePoint], title: str | None = None) -> Any:
    """Mean KLD against file size, one trace per series (joined in size order, but for joules'
    files of a preset's types), 95 % intervals as error bars, every point named on hover (the
    target-size and imatrix points also by a label)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in [*SERIES, *sorted({p.series for p in points} - set(SERIES))]:
        pts = sorted((p for p in points if p.series == name), key=lambda p: p.size_mib)
        if not pts:
            continue
        symbol, dash, colour = SERIES.get(name, ("circle", "solid", None))
        labelled = name in (TARGET, PEER_IMATRIX)
        mode = ("lines+markers" if dash else "markers") + ("+text" if labelled else "")
        lo = [p.kld - p.kld_ci95[0] if p.kld_ci95 else 0.0 for p in pts]
        hi = [p.kld_ci95[1] - p.kld if p.kld_ci95 else 0.0 for p in pts]
        fig.add_trace(
            go.Scatter(
                x=[p.size_mib for p in pts],
                y=[p.kld for p in pts],
                error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True},
                mode=mode,
                name=name,
                line={"dash": dash or "solid", "color": colour, "width": 2},
                marker={"symbol": symbol, "size": 10, "color": colour},
                text=[p.label for p in pts] if labelled else None,
                textposition="bottom center" if name == TARGET else "top center",
                textfont={"size": 10},
                hovertext=[
                    f"{p.label}<br>{p.size_mib:.1f} MiB<br>mean KLD {p.kld:.4f}" for p in pts
                ],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="GGUF file size (MiB)",
        yaxis_title="mean KL divergence from the base (nat)",
        height=520,
        margin={"t": 50 if title else 30},
        legend={"orientation": "h", "y": -0.16, "yanchor": "top"},
    )
    return fig
