"""``joules formats``: the number-format lab.

    $ joules formats list [--json]
    $ joules formats compare --source gaussian --formats int4-g128,mxfp4,nxfp4,nf4
    $ joules formats compare --source smollm2-135m            # every Linear weight of a model

``compare`` runs each format's fake_quant over the tensors and prints SQNR, max error, clipping and
exact bits per element, with the block floating-point theory (model SQNR, error bound) beside the
measurement for block formats. All formats are emulated (fp32 arithmetic, no native kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit
from joules.errors import ConfigError

formats_app = typer.Typer(
    help="Number formats: list them, compare their error.", no_args_is_help=True
)
app.add_typer(formats_app, name="formats")

SYNTHETIC = ("gaussian", "laplace", "student-t")
BENCH_SHAPE = (4096, 4096)


@dataclass
class FormatRow:
    name: str
    family: str
    bits_per_element: float
    spec: str
    description: str
    emulated: bool = True


@dataclass
class CompareResult:
    source: str
    kind: str  # "synthetic" | "model"
    tensors: int
    numel: int
    results: list[Any] = field(default_factory=list)


def format_rows() -> list[FormatRow]:
    """The preset formats with their bits per element for a 4096x4096 tensor."""
    from joules import formats

    return [
        FormatRow(f.name, f.family, f.bits_per_element(BENCH_SHAPE), f.spec, f.description)
        for f in formats.list()
    ]


def synthetic_tensor(kind: str, shape: tuple[int, int] = (1024, 4096), seed: int = 0) -> Any:
    """A seeded synthetic weight-like tensor: unit-scale gaussian, laplace or student-t (df 3)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    if kind == "laplace":  # inverse CDF of Laplace(0, 1)
        return (-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())).float()
    if kind == "student-t":  # df = 3: normal / sqrt(chi2_3 / 3)
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        chi = torch.randn((3, *shape), generator=gen, dtype=torch.float64).square().sum(0)
        return (z / (chi / 3).sqrt()).float()
    raise ConfigError(
        f"unknown synthetic source '{kind}': use {', '.join(SYNTHETIC)} or a model spec"
    )


def _render_list(rows: list[FormatRow]) -> None:
    t = Table(
        title="number formats (bits/element for a 4096x4096 tensor; all emulated)",
        title_justify="left",
    )
    t.add_column("name", style="bold")
    t.add_column("family")
    t.add_column("bits/elem", justify="right")
    t.add_column("spec")
    t.add_column("what")
    for r in rows:
        t.add_row(r.name, r.family, f"{r.bits_per_element:.4f}", r.spec, r.description)
    console.print(t)


@formats_app.command("list")
def list_cmd(json: bool = JSON_OPTION) -> None:
    """List the preset formats: name, family, bits per element, canonical spec."""
    emit(format_rows(), json, _render_list)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _render_compare(r: CompareResult) -> None:
    title = (
        f"format error on {r.source}: {r.tensors} tensor(s), {r.numel:,} elements "
        "(emulated; 'model' = block floating-point theory)"
    )
    t = Table(title=title, title_justify="left")
    for col, j in [
        ("format", "left"),
        ("bits/elem", "right"),
        ("SQNR dB", "right"),
        ("model dB", "right"),
        ("MSE", "right"),
        ("max abs err", "right"),
        ("bound in-range", "right"),
        ("max rel err", "right"),
        ("clipped %", "right"),
    ]:
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for e in r.results:
        t.add_row(
            e.format,
            f"{e.bits_per_element:.4f}",
            _fmt(e.sqnr_db, ".2f"),
            _fmt(e.sqnr_model_db, ".2f"),
            _fmt(e.mse, ".3e"),
            _fmt(e.max_abs_error, ".3e"),
            _fmt(e.bound_max_abs_error, ".3e"),
            _fmt(e.max_rel_error, ".3f"),
            _fmt(100 * e.frac_clipped, ".4f"),
        )
    console.print(t)


@formats_app.command("compare")
def compare_cmd(
    source: str = typer.Option(
        "gaussian",
        help="gaussian, laplace, student-t (1024x4096, seeded) or a model spec (every Linear weight).",
    ),
    formats_: str = typer.Option(
        "",
        "--formats",
        help="Comma-separated format specs (default: every preset of `joules formats list`).",
    ),
    seed: int = typer.Option(0, help="Seed of the synthetic tensor."),
    json: bool = JSON_OPTION,
) -> None:
    """Measure SQNR, max error, clipping and bits per format on synthetic tensors or a model."""
    from joules import formats
    from joules.formats.error import compare_formats, linear_weights

    specs = [s.strip() for s in formats_.split(",") if s.strip()] or [
        f.name for f in formats.list()
    ]
    fmts = [formats.get(s) for s in specs]  # bad specs fail here, before any work
    if source.lower() in SYNTHETIC:
        tensors = {source.lower(): synthetic_tensor(source.lower(), seed=seed)}
        kind = "synthetic"
    else:
        from joules.models import load_model

        with console.status(f"loading {source}"):
            model, _, _ = load_model(source)
        tensors = linear_weights(model)
        kind = "model"
    numel = sum(t.numel() for t in tensors.values())
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=json,
    ) as bar:
        task = bar.add_task("formats", total=len(fmts) * len(tensors))

        def tick(spec: str, name: str) -> None:
            bar.update(task, advance=1, description=f"{spec} {name}")

        results = compare_formats(tensors, fmts, progress=tick)
    emit(CompareResult(source, kind, len(tensors), numel, results), json, _render_compare)
