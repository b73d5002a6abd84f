"""``joules predict``: latency, energy and memory of a model on any catalogued hardware, predicted.

    $ joules predict MODEL --hardware h100,a100,this-machine --format int4-g128 \\
          --prompt-len 512 --gen-len 128 [--batch 1] [--json]
    $ joules predict hardware [--catalog FILE] [--json]       # the catalog, with sources
    $ joules predict calibrate --from RESULTS.json [--model M]  # fit this machine

Shape of the command: ``predict`` is a group whose subcommands are ``model`` (the default),
``hardware`` and ``calibrate``; a first argument that is not a subcommand name is taken as the
MODEL of ``predict model``, so ``joules predict smollm2-135m`` and ``joules predict model
smollm2-135m`` are the same (a model directory literally named ``hardware`` is passed as
``./hardware``). MODEL is anything joules loads (``smollm2-135m``, an HF or compressed
directory) or just a ``config.json``: only the config is read, never the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from joules.cli._app import JSON_OPTION, app, console, emit
from joules.errors import ConfigError, DataError


class _ModelByDefault(TyperGroup):
    """Route ``joules predict MODEL ...`` to ``joules predict model MODEL ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


predict_app = typer.Typer(
    cls=_ModelByDefault,
    help="Predict latency, energy and memory (analytic roofline, calibrated on this machine).",
    no_args_is_help=True,
)
app.add_typer(predict_app, name="predict")

CATALOG_OPTION = typer.Option(
    None, "--catalog", help='Extra hardware catalog JSON ({"devices": [...]}); repeatable.'
)


def _fmt_s(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _gib(x: float) -> str:
    return f"{x / 2**30:.3g} GiB"


@predict_app.command("model")
def model_cmd(
    model: str = typer.Argument(
        ..., help="smollm2-135m, an HF/compressed directory, or a config.json"
    ),
    hardware: str = typer.Option("this-machine,h100", "--hardware", help="Comma-separated names."),
    fmt: str | None = typer.Option(
        None, "--format", help="Weight format of the decoder linears (default: compute dtype)."
    ),
    prompt_len: int = typer.Option(512, "--prompt-len"),
    gen_len: int = typer.Option(128, "--gen-len"),
    batch: int = typer.Option(1, "--batch"),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Compute dtype (default: fp32 on CPUs, bf16/fp16 on GPUs)."
    ),
    catalog: list[Path] | None = CATALOG_OPTION,
    operators: bool = typer.Option(False, "--operators", help="Also print the per-operator table."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Predict one model on one or more hardware entries, side by side."""
    from joules.predict import ModelShape, Workload, predict

    files = tuple(str(c) for c in catalog or ())
    names = [h.strip() for h in hardware.split(",") if h.strip()]
    if not names:
        raise ConfigError("--hardware is empty: pass names such as h100,a100,this-machine")
    shape, manifest = ModelShape.load(model)
    wl = Workload(prompt_len, gen_len, batch, compute_dtype=dtype)
    preds = [
        predict(shape, n, wl, weight_format=fmt, manifest=manifest, catalog_files=files)
        for n in names
    ]
    emit(
        {"model": shape.to_dict(), "predictions": preds},
        as_json,
        lambda _: _render(preds, operators),
    )


def _render(preds: list[Any], operators: bool) -> None:
    p0 = preds[0]
    w = p0.workload
    t = Table(
        title=f"{p0.model}, weights {p0.weight_format}, batch {w['batch']}, prompt "
        f"{w['prompt_len']}, generate {w['gen_len']} — predicted",
        title_justify="left",
    )
    t.add_column("")
    for p in preds:
        tag = " (uncal.)" if not p.calibrated else " (degenerate fit)" if p.degenerate_fit else ""
        t.add_column(p.hardware + tag, justify="right")

    def band(p: Any, phase: str) -> str:
        r = p.band.get(phase)
        return f"±{r:.0%}" if r is not None and math.isfinite(r) else "none (uncalibrated)"

    rows = [
        ("compute dtype", lambda p: p.compute_dtype),
        ("time to first token", lambda p: _fmt_s(p.prefill_s)),
        ("prefill tokens/s", lambda p: f"{p.prefill_tok_s:,.0f}"),
        ("prefill bound", lambda p: p.bound("prefill")),
        ("time per output token", lambda p: _fmt_s(p.tpot_s)),
        ("decode tokens/s", lambda p: f"{p.decode_tok_s:,.1f}"),
        ("decode bound", lambda p: p.bound("decode")),
        (
            "latency band (prefill / decode)",
            lambda p: f"{band(p, 'prefill')} / {band(p, 'decode')}",
        ),
        ("decode J/token", lambda p: f"{p.decode_j_per_token:.3g}"),
        ("J/token (whole run)", lambda p: f"{p.j_per_token:.3g}"),
        ("weights", lambda p: f"{_gib(p.weights_bytes)} ({p.bits_per_weight:.2f} b/w)"),
        ("KV cache", lambda p: _gib(p.kv_cache_bytes)),
        ("peak memory", lambda p: _gib(p.peak_memory_bytes) + ("" if p.fits_in_memory else " ✗")),
    ]
    for label, f in rows:
        t.add_row(label, *[f(p) for p in preds])
    console.print(t)
    for p in preds:
        for n in p.notes:
            console.print(f"[dim]{p.hardware}: {n}[/]", highlight=False)
    if operators:
        for p in preds:
            ot = Table(title=f"{p.hardware}: per operator (summed over layers and steps)")
            for c in ("phase", "operator", "GFLOP", "MB moved", "time", "bound"):
                ot.add_column(c, justify="left" if c in ("phase", "operator", "bound") else "right")
            for o in p.operators:
                ot.add_row(
                    o.phase,
                    o.name,
                    f"{o.flops / 1e9:.3g}",
                    f"{o.nbytes / 1e6:.3g}",
                    _fmt_s(o.time_s),
                    o.bound,
                )
            console.print(ot)


@predict_app.command("hardware")
def hardware_cmd(catalog: list[Path] | None = CATALOG_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List the hardware catalog: peaks, bandwidth, memory, power, and where each comes from."""
    from joules.predict.catalog import load_catalog, this_machine

    specs = list(load_catalog(tuple(str(c) for c in catalog or ())).values())
    try:
        specs.insert(0, this_machine())
    except ConfigError as exc:
        console.print(f"[dim]this-machine: {escape(str(exc))}[/]")

    def render(_: Any) -> None:
        t = Table(title="hardware catalog of joules predict", title_justify="left")
        for c in ("name(s)", "device", "fp32 TF", "bf16 TF", "GB/s", "GiB", "TDP W", "idle W"):
            t.add_column(c, justify="left" if c in ("name(s)", "device") else "right")
        for s in specs:
            t.add_row(
                ", ".join(dict.fromkeys((*s.aliases, s.id))),
                s.name,
                f"{s.peak_flops.get('fp32', float('nan')) / 1e12:.3g}",
                f"{s.peak_flops.get('bf16', float('nan')) / 1e12:.3g}",
                f"{s.bandwidth_bps / 1e9:,.4g}",
                f"{s.memory_bytes / 2**30:.0f}",
                f"{s.tdp_w:.3g}",
                f"{s.idle_w:.3g}",
            )
        console.print(t)
        console.print("[dim]sources: `joules predict hardware --json`[/]")

    emit(specs, as_json, render)


@predict_app.command("calibrate")
def calibrate_cmd(
    results: Path = typer.Option(
        ..., "--from", help="A bench result JSON (`joules bench --json`)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model the runs used (default: as recorded)."
    ),
    fmt: str | None = typer.Option(
        None, "--format", help="Weight format of the runs (default: as recorded)."
    ),
    hardware: str = typer.Option("this-machine", "--hardware"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Fit this machine's effective peaks, overheads and energy coefficients; store them."""
    from joules.predict import ModelShape
    from joules.predict.calibrate import fit, observations_from_bench, save_calibration
    from joules.predict.catalog import get_hardware

    try:
        data = json.loads(results.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read bench results {results}: {exc}") from exc
    shape = ModelShape.load(model)[0] if model else None
    obs, method = observations_from_bench(data, shape, fmt)
    hw = get_hardware(hardware)
    cal = fit(obs, hw, energy_method=method)
    path = save_calibration(cal)

    def render(_: Any) -> None:
        c = cal.coefficients
        t = Table(title=f"calibration of {hw.id} on {cal.n_points} runs (stored in {path})")
        t.add_column("coefficient")
        t.add_column("value", justify="right")
        t.add_column("from")

        def source(name: str) -> str:
            d = c.degenerate.get(name)
            if d:
                return f"fitted, DEGENERATE: at its {d['bound']} bound {d['limit']:g}"
            return c.status.get(name, "–")

        t.add_row(
            "FLOP/s efficiency (of the peak), prefill",
            f"{c.flops_efficiency:.3g}",
            source("flops_efficiency"),
        )
        dec = c.decode_flops_efficiency
        t.add_row(
            "FLOP/s efficiency, decode",
            f"{dec:.3g}" if dec is not None else "as prefill",
            source("decode_flops_efficiency"),
        )
        t.add_row(
            "bandwidth efficiency",
            f"{c.bandwidth_efficiency:.3g}",
            source("bandwidth_efficiency"),
        )
        for ph, v in c.overhead_s.items():
            t.add_row(
                f"overhead per operator call, {ph}", f"{v * 1e6:.3g} µs", source(f"overhead_s.{ph}")
            )
        t.add_row(
            "dequantisation per weight element",
            f"{c.dequant_s_per_element * 1e9:.3g} ns",
            source("dequant_s_per_element"),
        )
        t.add_row("static power", f"{c.static_w:.3g} W", source("static_w"))
        t.add_row("energy per FLOP", f"{c.e_flop_j * 1e12:.3g} pJ", source("e_flop_j"))
        t.add_row("energy per byte", f"{c.e_byte_j * 1e12:.3g} pJ", source("e_byte_j"))
        cap = c.max_power_w
        t.add_row("power cap", f"{cap:.3g} W" if cap is not None else "none", source("max_power_w"))
        for ph, r in c.band.items():
            t.add_row(f"latency band (95 % of |rel. residual|), {ph}", f"±{r:.1%}", "fitted")
        console.print(t)
        verdict = (
            f"DEGENERATE fit ({c.degenerate_summary()}): not a validated roofline"
            if c.degenerate
            else "fit inside its bounds"
        )
        console.print(verdict, markup=False, highlight=False)
        for n in cal.notes:
            if not n.startswith("degenerate fit:"):  # said by the verdict above
                console.print(n, style="dim", markup=False, highlight=False)

    emit(cal, as_json, render)
