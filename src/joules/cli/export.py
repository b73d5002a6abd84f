"""``joules export``: write a (compressed) model as a GGUF file for llama.cpp.

$ joules export out/ --to gguf -o out.gguf
$ joules export out/ --to gguf -o out.gguf --dequantize f16 --json
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit, err_console


def _render(res: Any) -> None:
    t = Table(title=f"GGUF export: {res.path}")
    t.add_column("GGUF type")
    t.add_column("tensors", justify="right")
    t.add_column("MiB", justify="right")
    t.add_column("from")
    by: dict[str, list[Any]] = {}
    for x in res.tensors:
        by.setdefault(x.ggml_type, []).append(x)
    for ty, xs in sorted(by.items()):
        src = Counter(x.source_format or "float" for x in xs)
        t.add_row(
            ty,
            str(len(xs)),
            f"{sum(x.nbytes for x in xs) / 2**20:.2f}",
            ", ".join(f"{k} x{v}" for k, v in src.items()),
        )
    console.print(t)
    exact = "exact (every tensor as computed)" if res.exact else "NOT exact (see --json)"
    console.print(
        f"{res.file_nbytes / 2**20:.2f} MiB, {exact}; tokenizer from {res.tokenizer_from}; "
        f"permuted rows: {sum(x.permuted for x in res.tensors)} attn_q/attn_k tensors"
    )


@app.command("export")
def export_cmd(
    model: str = typer.Argument(
        ..., help="A compressed directory (joules compress -o), or any model spec."
    ),
    to: str = typer.Option("gguf", "--to", help="Target format (gguf)."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (.gguf)."),
    float_type: str = typer.Option(
        "f32", "--float-type", help="Type of float tensors: f32, f16, bf16."
    ),
    dequantize: str = typer.Option(
        "",
        "--dequantize",
        help="Write layers in non-GGUF formats dequantized as f32/f16/bf16 (else refused).",
    ),
    embedding: str = typer.Option(
        "",
        "--embedding",
        help="GGUF type for a float token embedding (e.g. gguf-q8_0, what llama.cpp uses for SmolLM2).",
    ),
    output_head: str = typer.Option(
        "",
        "--output-head",
        help="GGUF type for an untied float output head (e.g. gguf-q6_k, what llama-quantize's "
        "presets use).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Export MODEL to GGUF: GGUF-exact tensors written as computed, never re-quantized."""
    from joules.deploy import export_gguf
    from joules.errors import ConfigError

    if to.lower() != "gguf":
        raise ConfigError(f"--to {to!r}: the only export target is gguf")
    from joules.deploy.runtime_choice import export_note

    note = export_note(model)
    if note is not None:
        err_console.print(f"[dim]{note}[/]", soft_wrap=True)
    out_console = err_console if as_json else console
    with out_console.status(f"exporting {model}"):
        res = export_gguf(
            model,
            output,
            float_type=float_type,
            dequantize=dequantize or None,
            embedding=embedding or None,
            output_head=output_head or None,
        )
    emit(res, as_json, _render)
