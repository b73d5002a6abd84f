"""``joules measure -- CMD ARGS...`` and ``joules idle``: energy of a command, idle baseline.

    $ joules measure -- python train.py --epochs 1
    $ joules measure --json --region FR --pue 1.2 -- ./bench.sh
    $ joules measure --gpu-power-limit 250 -- python serve.py
    $ joules idle --seconds 10

``measure`` runs the command directly (no shell: quote nothing, expand nothing), lets its output
through, then prints energy, duration, average power, method, uncertainty, CO2 and water (or the
``Measurement`` as JSON with ``--json``), and exits with the command's own exit status (128+N when
a signal N killed it). ``--output PATH`` also writes the JSON there; an unwritable PATH is one
line on stderr after the result (exit: the command's status if it failed, else 2). Counters meter whole devices; the estimator counts only the command's
process tree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from joules.cli._app import (
    JSON_OPTION,
    app,
    console,
    emit,
    print_error,
    print_json,
    to_jsonable,
)
from joules.errors import ConfigError
from joules.serialize import atomic_write_json


def _make_meter(**kwargs: Any) -> Any:
    """Build the meter (a seam: tests swap in fake devices here)."""
    from joules.measure import detect_meter

    return detect_meter(**kwargs)


def _fmt_j(j: float | None) -> str:
    if j is None:
        return "-"
    if abs(j) >= 3.6e3:
        return f"{j:,.1f} J ({j / 3.6e3:.3f} Wh)"
    return f"{j:.3f} J"


def measurement_line(m: Any) -> str:
    """One line for people: energy ± uncertainty (method), power, net energy, CO2.

    For the demo: ``console.print(measurement_line(w.measurement))``.
    """
    if m.net_energy_j is not None:
        net = f", net {_fmt_j(m.net_energy_j)} ± {m.net_uncertainty_j or 0.0:.3g} J"
    elif m.net_energy_covered_j is not None:
        covered = ", ".join(
            k for k, d in m.domains.items() if d.in_total and k not in m.uncovered_domains
        )
        net = (
            f", net of {covered} only {_fmt_j(m.net_energy_covered_j)} "
            f"(no idle baseline for {', '.join(m.uncovered_domains)})"
        )
    else:
        net = ""
    co2 = f", {m.co2_g:.3g} g CO2" if m.co2_g is not None else ""
    return (
        f"{_fmt_j(m.energy_j)} ± {m.uncertainty_j:.3g} J ({m.method}) over {m.duration_s:.2f} s "
        f"= {m.avg_power_w:.2f} W{net}{co2}"
    )


def render_measurement(m: Any, title: str | None = None) -> None:
    """Print a Measurement as a rich table (used by ``measure`` and reusable by other commands)."""
    t = Table(title=title or f"energy of {m.name}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    rel = f" (±{m.relative_uncertainty:.0%})" if m.energy_j > 0 else ""
    t.add_row("energy", f"{_fmt_j(m.energy_j)} ± {m.uncertainty_j:.3f} J{rel}")
    t.add_row("method", m.method)
    t.add_row("duration", f"{m.duration_s:.3f} s")
    t.add_row("average power", f"{m.avg_power_w:.2f} W")
    _net_rows(t, m)
    for name, d in m.domains.items():
        counted = "" if d.in_total else ", inside another domain: not added"
        t.add_row(
            f"  {name}",
            f"{_fmt_j(d.energy_j)} ± {d.uncertainty_j:.3f} J ({d.backend}, {d.method}{counted})",
        )
    c = m.carbon or {}
    if m.co2_g is not None:
        year = f", {c['grid_year']}" if c.get("grid_year") else ""
        t.add_row(
            "CO2",
            f"{m.co2_g:.4f} g (grid {c.get('grid_g_per_kwh', 0):g} g/kWh in "
            f"{c.get('region')}{year}, PUE {c.get('pue', 1):g}; embodied "
            f"{c.get('embodied_co2_g', 0):.4f} g)",
        )
    t.add_row("water", f"{m.water_l:.6f} L" if m.water_l is not None else "- (pass --wue L/kWh)")
    for note in m.notes:
        t.add_row("note", f"[dim]{note}[/]")
    console.print(t)


def _net_rows(t: Table, m: Any) -> None:
    """Net energy in words: complete, partial (which domains lack a baseline), or none."""
    unc = f" ± {m.net_uncertainty_j:.3f} J (gross and idle-baseline uncertainty)"
    if m.net_energy_j is not None:
        t.add_row("idle power", f"{m.idle_power_w:.2f} W")
        t.add_row("net energy (minus idle)", _fmt_j(m.net_energy_j) + unc)
        return
    missing = ", ".join(m.uncovered_domains)
    if m.net_energy_covered_j is None:
        t.add_row("net energy", f"- (no idle baseline for {missing}: run `joules idle`)")
        return
    covered = [k for k, d in m.domains.items() if d.in_total and k not in m.uncovered_domains]
    t.add_row("idle power", f"{m.idle_power_w:.2f} W ({', '.join(covered)} only)")
    t.add_row("net energy", f"- (no idle baseline for {missing}: run `joules idle`)")
    t.add_row(f"net energy of {', '.join(covered)} only", _fmt_j(m.net_energy_covered_j) + unc)


def _carbon(region: str | None, grid: float | None, pue: float, wue: float | None) -> Any:
    from joules.measure import CarbonConfig

    return CarbonConfig(region=region, g_per_kwh=grid, pue=pue, wue_l_per_kwh=wue)


@app.command(
    context_settings={"allow_interspersed_args": False},
    no_args_is_help=True,
)
def measure(
    cmd: list[str] = typer.Argument(..., metavar="-- CMD ARGS...", help="The command to run."),
    json: bool = JSON_OPTION,
    interval: float = typer.Option(0.1, "--interval", help="Power sampling period (s)."),
    region: str = typer.Option(
        None, "--region", help="Grid region: FR, US-CA, gcp:europe-west1 (default world average)."
    ),
    grid: float = typer.Option(None, "--grid-g-per-kwh", help="Grid intensity (g CO2/kWh)."),
    pue: float = typer.Option(1.0, "--pue", help="Power usage effectiveness of the facility."),
    wue: float = typer.Option(None, "--wue", help="Water usage effectiveness (L/kWh)."),
    cpu_tdp_w: float = typer.Option(None, "--cpu-tdp-w", help="CPU TDP for the estimator (W)."),
    gpu_power_limit: float = typer.Option(
        None, "--gpu-power-limit", help="Set this GPU power limit (W) for the run (needs root)."
    ),
    timeline: bool = typer.Option(False, "--timeline", help="Include the power timeline."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON here."),
) -> None:
    """Run CMD (no shell), measure its energy, and exit with its exit status."""
    if not interval > 0:
        raise ConfigError(f"--interval must be > 0 seconds, got {interval}")
    carbon = _carbon(region, grid, pue, wue)
    meter = _make_meter(
        scope="children", interval_s=interval, timeline=timeline, carbon=carbon, cpu_tdp_w=cpu_tdp_w
    )
    try:
        if gpu_power_limit is not None:
            from joules.measure.power import gpu_power_limit as limit_ctx

            with limit_ctx(meter, gpu_power_limit):
                m, rc = _run(meter, cmd)
        else:
            m, rc = _run(meter, cmd)
    finally:
        meter.close()
    # Print first: a bad --output must not lose the measurement (or the command's status).
    emit(m, json, lambda r: render_measurement(r, f"energy of `{' '.join(cmd)}`"))
    if output is not None:
        try:
            atomic_write_json(output, to_jsonable(m), indent=2)
        except OSError as exc:
            print_error(
                f"could not write --output {str(output)!r}: "
                f"{exc.strerror or exc} (the measurement is printed above; pick a writable path)"
            )
            # the command's own failure wins; a command that succeeded exits 2 (bad input)
            raise typer.Exit(rc or 2) from None
    raise typer.Exit(rc)


def _run(meter: Any, cmd: list[str]) -> tuple[Any, int]:
    name = " ".join(cmd)
    w = meter.begin(name)
    try:
        proc = subprocess.Popen(cmd)  # a list, no shell: arguments reach CMD as given
    except FileNotFoundError as exc:
        meter.end(w)
        raise ConfigError(
            f"command not found: {cmd[0]!r} (check the name or give its path)"
        ) from exc
    except PermissionError as exc:
        meter.end(w)
        raise ConfigError(f"{cmd[0]!r} is not executable (chmod +x it)") from exc
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it end
        rc = proc.wait()
    m = meter.end(w)
    return m, (128 - rc if rc < 0 else rc)


@app.command()
def idle(
    seconds: float = typer.Option(10.0, "--seconds", help="How long to measure idle power."),
    json: bool = JSON_OPTION,
    cpu_tdp_w: float = typer.Option(None, "--cpu-tdp-w", help="CPU TDP for the estimator (W)."),
) -> None:
    """Measure this machine's idle power and cache it: later measurements report net energy."""
    from joules.measure.idle import idle_cache_path, measure_idle, save_idle

    if not seconds > 0:
        raise ConfigError(f"--seconds must be > 0, got {seconds}")
    meter = _make_meter(scope="system", cpu_tdp_w=cpu_tdp_w, idle_power_w=None)
    try:
        if json:
            baseline = measure_idle(meter, seconds)
        else:
            with Progress(
                TextColumn("measuring idle power (keep the machine quiet)"),
                BarColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("idle", total=1.0)
                baseline = measure_idle(meter, seconds, lambda f: bar.update(task, completed=f))
    finally:
        meter.close()
    save_idle(baseline)
    result = {**baseline.to_dict(), "cache": str(idle_cache_path())}
    if json:
        print_json(result)
        return
    t = Table(title="idle baseline", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("idle power", f"{baseline.total_idle_power_w:.2f} ± {baseline.uncertainty_w:.2f} W")
    for dom, w in baseline.idle_power_w.items():
        unc = baseline.uncertainty_w_by_domain.get(dom)
        t.add_row(f"  {dom}", f"{w:.2f} W" + (f" ± {unc:.2f} W" if unc is not None else ""))
    t.add_row("method", baseline.method)
    t.add_row("measured over", f"{baseline.seconds:.1f} s at {baseline.measured_at}")
    t.add_row("cached in", result["cache"])
    console.print(t)
