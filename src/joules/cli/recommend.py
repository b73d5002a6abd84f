"""``joules recommend``: which version of the model to ship, under your constraints, and why.

    $ joules recommend joules.db --max-ppl-increase 2% --objective energy
    $ joules recommend joules.db --max-ppl-increase 1% --max-model-bytes 80MB --objective bytes
    $ joules recommend joules.db --max-ppl-increase 2% --max-tpot-ms 50 --objective latency \\
          --hardware h100 --json
    $ joules recommend joules.db --max-accuracy-drop 1 --min-accuracy 0.40   # hellaswag in [eval]
    $ joules recommend joules.db --max-kld 0.05 --objective energy --export ship.gguf

Every figure is printed with its method (measured / estimated / predicted / emulated) and its
95 % interval where it has one; the decision rules are printed with the answer.
"""

from __future__ import annotations

import math
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit
from joules.errors import ConfigError
from joules.sweep.analyze import (
    FIGURES,
    OBJECTIVES,
    Candidate,
    Constraints,
    human_bytes,
    parse_accuracy,
    parse_bytes,
    parse_percent,
    parse_points,
)
from joules.sweep.store import Metric

_LABELS = {
    "perplexity": "perplexity",
    "ppl_increase_pct": "perplexity increase",
    "acc_norm": "acc_norm",
    "accuracy_drop_pts": "acc_norm drop",
    "j_per_token": "energy / token",
    "tpot_ms": "TPOT",
    "ttft_ms": "TTFT",
    "tokens_per_s": "decode tokens/s",
    "model_bytes": "model bytes",
    "bits_per_weight": "bits / weight",
    "peak_rss_bytes": "peak RSS",
    "kld_mean": "mean KLD",
    "kld_p99": "p99 KLD",
    "same_top_pct": "same top token",
    "ppl_ratio": "perplexity ratio",
}


def _num(m: Metric, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if m.unit == "B":
        return human_bytes(v)
    if m.unit == "%":
        return f"{v:+.2f} %"
    if m.unit == "J/tok":
        return f"{v * 1000:.3g} mJ" if abs(v) < 1 else f"{v:.3g} J"
    if m.unit == "ms":
        return f"{v:.3g} ms"
    if m.unit == "pt":
        return f"{v:+.2f} pt"
    if m.unit == "nat":
        return f"{v:.4f} nat"
    return f"{v:.4g}{(' ' + m.unit) if m.unit else ''}"


def fmt(m: Metric | None) -> str:
    """'12.3 ms [11.8 – 12.9] measured' (the interval only when known)."""
    if m is None:
        return "-"
    s = _num(m, m.value)
    if m.lo is not None and m.hi is not None:
        s += f" [{_num(m, m.lo).lstrip('+')} – {_num(m, m.hi).lstrip('+')}]"
    where = f" on {m.hardware}" if m.hardware else ""
    return f"{s} ({m.method}{where})"


_SHORT = {
    "--max-ppl-increase": "ppl",
    "--max-model-bytes": "bytes",
    "--max-peak-rss": "rss",
    "--max-tpot-ms": "tpot",
    "--min-accuracy": "acc",
    "--max-accuracy-drop": "acc drop",
    "--max-kld": "kld",
}


def _short(m: Metric | None) -> str:
    if m is None:
        return "-"
    s = _num(m, m.value)
    if m.lo is not None and m.hi is not None:
        s += f" [{_num(m, m.lo).lstrip('+')}, {_num(m, m.hi).lstrip('+')}]"
    return s


def _limit(flag: str, limit: float) -> str:
    if flag in ("--max-model-bytes", "--max-peak-rss"):
        return human_bytes(limit)
    if flag == "--min-accuracy":
        return f"{limit:g}"
    if flag == "--max-accuracy-drop":
        return f"{limit:g} pt"
    if flag == "--max-kld":
        return f"{limit:g} nat"
    return f"{limit:g} %" if flag == "--max-ppl-increase" else f"{limit:g} ms"


def _metric(d: dict[str, Any] | None) -> Metric | None:
    return None if d is None else Metric(**d)


def _figure_table(title: str, c: Candidate) -> Table:
    t = Table(title=escape(title), title_justify="left")
    t.add_column("figure")
    t.add_column("value [95 % interval] (method)")
    for name, label in _LABELS.items():
        if name in c.figures:
            t.add_row(label, escape(fmt(c.figures[name])))
    return t


def _render(r: Any) -> None:
    metric_label = _LABELS[r.metric]
    console.print(
        f"[bold]objective:[/] minimise {metric_label} on {r.hardware}"
        + (f" · workload {r.workload}" if r.workload else "")
    )
    console.print(
        "[bold]constraints:[/] " + ("; ".join(r.constraints) if r.constraints else "none")
    )
    if r.chosen is not None:
        c = r.chosen
        console.print(f"\n[bold green]ship:[/] {escape(c.label)}  [dim](run {c.key})[/]")
        console.print(_figure_table("its figures", c))
        console.print("[bold]why:[/]")
        if r.bound_by:
            for b in r.bound_by:
                fig = _metric(b["figure"])
                what = _LABELS.get(fig.name, fig.name) if fig else b["flag"]
                console.print(
                    f"  • {b['flag']} bound: {escape(b['excluded'])} has a better {metric_label} "
                    f"but its {what} is {escape(fmt(fig))} ({b['status']} against {_limit(b['flag'], b['limit'])})",
                    soft_wrap=True,
                )
        else:
            console.print(
                f"  • no constraint bound: it has the best {metric_label} of every finished run"
            )
        if r.runner_up is not None:
            u = r.runner_up
            a, b = c.figures.get(r.metric), u.figures.get(r.metric)
            gain = ""
            if a and b and a.value == b.value:
                gain = " (a tie: chosen for its smaller perplexity increase)"
            elif a and b and a.value and b.value:
                gain = f" ({100 * (b.value - a.value) / b.value:.1f} % better {metric_label})"
            console.print(
                f"  • runner-up {escape(u.label)}: {metric_label} {escape(fmt(b))} vs "
                f"{escape(fmt(a))}{gain}",
                soft_wrap=True,
            )
            if r.given_up:
                for g in r.given_up:
                    label = _LABELS.get(g["metric"], g["metric"])
                    console.print(
                        f"    given up: {label} {escape(fmt(_metric(g['chosen'])))} vs "
                        f"{escape(fmt(_metric(g['runner_up'])))} for the runner-up",
                        soft_wrap=True,
                    )
            else:
                console.print("    given up: nothing; it is at least as good on every figure")
        else:
            console.print("  • it is the only run that meets the constraints")
    else:
        console.print("\n[bold red]nothing meets the constraints.[/]")
        c = r.closest
        console.print(f"[bold]closest:[/] {escape(c.label)}  [dim](run {c.key})[/]")
        for chk in c.checks:
            if chk.status != "met":
                what = _LABELS.get(chk.figure.name, chk.flag) if chk.figure else chk.flag
                console.print(
                    f"  • {chk.flag} {_limit(chk.flag, chk.limit)}: {what} {escape(fmt(chk.figure))} — {chk.status}",
                    soft_wrap=True,
                )
        console.print(_figure_table("its figures", c))

    t = Table(title="every finished run", title_justify="left")
    cols = ["ppl_increase_pct", r.metric] + (["model_bytes"] if r.metric != "model_bytes" else [])
    if any("accuracy_drop_pts" in c.figures for c in r.candidates):
        cols.insert(1, "accuracy_drop_pts")
    if any("kld_mean" in c.figures for c in r.candidates):
        cols.insert(1, "kld_mean")
    t.add_column("run")
    for m in cols:
        t.add_column(_LABELS[m] + " [95 %]", justify="right")
    t.add_column("methods")
    t.add_column("constraints")
    front = {x.key for x in r.pareto}
    for c in r.candidates:
        status = ", ".join(f"{_SHORT[k.flag]} {k.status}" for k in c.checks if k.status != "met")
        figs = [c.figures.get(m) for m in cols]
        methods = sorted({f.method for f in figs if f is not None})
        t.add_row(
            escape(c.label) + (" *" if c.key in front else ""),
            *(escape(_short(f)) for f in figs),
            escape(", ".join(methods)),
            status or "met",
        )
    console.print(t)
    names = ", ".join(
        _LABELS[FIGURES[f.partition("@")[0]][0]]
        + (f" on {f.partition('@')[2]}" if "@" in f else "")
        for f in r.pareto_figures
    )
    console.print(f"[dim]* on the Pareto front of {names}[/]")
    for x in r.not_ranked:
        console.print(
            f"[yellow]not ranked:[/] {escape(x['run'])} ({escape(x['why'])})", soft_wrap=True
        )
    for rule in r.rules:
        console.print(f"[dim]rule: {rule}[/]", soft_wrap=True)


@app.command("recommend")
def recommend_cmd(
    store: str = typer.Argument("joules.db", help="The sweep's store."),
    max_ppl_increase: str = typer.Option(
        None, "--max-ppl-increase", help="e.g. 2%: perplexity increase over the baseline."
    ),
    max_model_bytes: str = typer.Option(None, "--max-model-bytes", help="e.g. 80MB."),
    max_peak_rss: str = typer.Option(None, "--max-peak-rss", help="e.g. 1GB."),
    max_tpot_ms: float = typer.Option(None, "--max-tpot-ms", help="Time per output token, ms."),
    min_accuracy: str = typer.Option(
        None, "--min-accuracy", help="e.g. 0.40 or 40%: acc_norm of a multiple-choice task."
    ),
    max_accuracy_drop: str = typer.Option(
        None,
        "--max-accuracy-drop",
        help="e.g. 1: acc_norm drop below the baseline, in percentage points.",
    ),
    objective: str = typer.Option(
        "energy", "--objective", help="What to minimise: " + "|".join(OBJECTIVES) + "."
    ),
    hardware: str = typer.Option(
        None, "--hardware", help="Use predictions for this hardware (default: measured here)."
    ),
    workload: str = typer.Option(
        None, "--workload", help="The bench workload when the store has several."
    ),
    max_kld: float = typer.Option(
        None, "--max-kld", help="e.g. 0.05: mean KL divergence from the baseline, nats/token."
    ),
    export: str = typer.Option(
        None,
        "--export",
        help="Copy the recommended run's deployable file here (a sweep on the llamacpp runtime).",
    ),
    pareto: str = typer.Option(
        None,
        "--pareto",
        help="Figures of the Pareto front, comma-separated: "
        + ", ".join(FIGURES)
        + "; NAME@HARDWARE for a prediction (default: ppl_increase and the objective).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Choose the configuration that best meets the objective under the constraints, and why."""
    from pathlib import Path

    from joules.sweep import Store, recommend

    if not Path(store).is_file():
        raise ConfigError(f"no store at {store!r}: run `joules sweep SPEC.toml --store {store}`")
    if max_tpot_ms is not None and max_tpot_ms <= 0:
        raise ConfigError(f"--max-tpot-ms must be positive, got {max_tpot_ms}")
    if max_kld is not None and not max_kld > 0:
        raise ConfigError(f"--max-kld must be a positive number of nats, got {max_kld}")
    constraints = Constraints(
        max_ppl_increase_pct=None if max_ppl_increase is None else parse_percent(max_ppl_increase),
        max_model_bytes=None
        if max_model_bytes is None
        else parse_bytes(max_model_bytes, "--max-model-bytes"),
        max_peak_rss_bytes=None
        if max_peak_rss is None
        else parse_bytes(max_peak_rss, "--max-peak-rss"),
        max_tpot_ms=max_tpot_ms,
        min_accuracy=None if min_accuracy is None else parse_accuracy(min_accuracy),
        max_accuracy_drop_pts=None
        if max_accuracy_drop is None
        else parse_points(max_accuracy_drop),
        max_kld=max_kld,
    )
    with Store(store) as st:
        runs = st.runs()
    figures = [f.strip() for f in pareto.split(",") if f.strip()] if pareto else None
    result = recommend(runs, constraints, objective, hardware, workload, figures)
    shipped = None
    if export is not None:
        if result.chosen is None:
            raise ConfigError(
                "--export: nothing meets the constraints, so there is no file to ship"
            )
        shipped = export_file(runs, result.chosen.key, export)
    emit(result, as_json, _render)
    if shipped is not None and not as_json:
        console.print(
            f"[bold]exported:[/] {escape(str(shipped['path']))} "
            f"({human_bytes(shipped['size_bytes'])}, sha256 {shipped['sha256'][:16]}…)"
        )


def export_file(runs: list[Any], key: str, dest: str) -> dict[str, Any]:
    """Copy run ``key``'s deployable file to ``dest`` (atomically), checking its sha256."""
    import shutil
    from pathlib import Path

    from joules.fingerprint import file_sha256
    from joules.serialize import atomic_path

    run = next((r for r in runs if r.key == key), None)
    gguf = ((getattr(run, "manifest", None) or {}).get("deploy") or {}).get("gguf")
    if not gguf:
        raise ConfigError(
            "--export: the recommended run has no deployable file: sweep with "
            '[eval] runtime = "llamacpp" or [bench] runtime = "llamacpp"'
        )
    src = Path(gguf["path"])
    if not src.is_file():
        raise ConfigError(
            f"--export: {src} is gone (cache cleared?): re-run the sweep to rebuild it"
        )
    out = Path(dest)
    if out.suffix != src.suffix:
        raise ConfigError(
            f"--export {dest}: the file is {src.suffix}, name it e.g. ship{src.suffix}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    size, digest = file_sha256(out)
    if digest != gguf["sha256"]:
        raise ConfigError(f"--export: {src} changed since the sweep measured it: re-run the sweep")
    return {"path": str(out), "size_bytes": size, "sha256": digest}


__all__ = ["recommend_cmd"]
