"""``joules export``: write a (compressed) model as a GGUF file for llama.cpp, or as a
compressed-tensors checkpoint folder for vLLM.

$ joules export out/ --to gguf -o out.gguf
$ joules export out/ --to gguf -o out.gguf --dequantize f16 --json
$ joules export out/ --to compressed-tensors -o ct/
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


def _render_ct(res: Any) -> None:
    t = Table(title=f"compressed-tensors export ({res.format}, {res.dtype}): {res.path}")
    t.add_column("scheme")
    t.add_column("layers", justify="right")
    t.add_column("MiB", justify="right")
    t.add_column("from")
    t.add_column("exact")
    by: dict[str, list[Any]] = {}
    for x in res.layers:
        by.setdefault(x.scheme or "dense", []).append(x)
    for scheme, xs in sorted(by.items()):
        src = Counter(x.source_format or "float" for x in xs)
        t.add_row(
            scheme,
            str(len(xs)),
            f"{sum(x.nbytes for x in xs) / 2**20:.2f}",
            ", ".join(f"{k} x{v}" for k, v in src.items()),
            "yes" if all(x.exact for x in xs) else "no",
        )
    console.print(t)
    floats = "as they were" if res.floats_exact else f"cast to {res.dtype}"
    console.print(
        f"{res.file_nbytes / 2**20:.2f} MiB; codes and scales as computed; "
        f"{res.float_tensors} float tensors {floats}; ignore: {', '.join(res.ignore) or '-'}"
    )
    console.print(f"serve with vLLM on a GPU: vllm serve {res.path}")


@app.command("export")
def export_cmd(
    model: str = typer.Argument(
        ..., help="A compressed directory (joules compress -o), or any model spec."
    ),
    to: str = typer.Option("gguf", "--to", help="Target format: gguf, compressed-tensors."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="File to write (.gguf), or folder (compressed-tensors)."
    ),
    float_type: str = typer.Option(
        "", "--float-type", help="GGUF: type of float tensors: f32 (default), f16, bf16."
    ),
    dequantize: str = typer.Option(
        "",
        "--dequantize",
        help="Write layers in formats the target cannot hold dequantized, as f32/f16/bf16 "
        "(compressed-tensors: f16/bf16, its scales' dtype); else they are refused.",
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
    """Export MODEL to GGUF (llama.cpp) or compressed-tensors (vLLM): quantized tensors written
    as computed, never re-quantized."""
    from joules.deploy import export_compressed_tensors, export_gguf
    from joules.errors import ConfigError

    target = to.lower()
    if target not in ("gguf", "compressed-tensors"):
        raise ConfigError(f"--to {to!r}: export targets are gguf and compressed-tensors")
    from joules.deploy.runtime_choice import export_note

    note = export_note(model) if target == "gguf" else None
    if note is not None:
        err_console.print(f"[dim]{note}[/]", soft_wrap=True)
    out_console = err_console if as_json else console
    if target == "compressed-tensors":
        for flag, value in (
            ("--float-type", float_type),
            ("--embedding", embedding),
            ("--output-head", output_head),
        ):
            if value:
                raise ConfigError(
                    f"{flag} is a GGUF option: a compressed-tensors checkpoint holds its floats "
                    "in its scales' dtype"
                )
        with out_console.status(f"exporting {model}"):
            ct = export_compressed_tensors(model, output, dequantize=dequantize or None)
        emit(ct, as_json, _render_ct)
        return
    with out_console.status(f"exporting {model}"):
        res = export_gguf(
            model,
            output,
            float_type=float_type or "f32",
            dequantize=dequantize or None,
            embedding=embedding or None,
            output_head=output_head or None,
        )
    emit(res, as_json, _render)
