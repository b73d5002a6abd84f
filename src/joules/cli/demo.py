"""``joules demo``: the main job end to end on the embedded default model (what `make demo` runs).

Today: load the model, show its ModelInfo, generate from a WikiText-2 prompt, show tokens/s.
Each later capability extends this until it is the whole pipeline. Every number printed here was
computed in this run.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.panel import Panel
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit


@dataclass
class DemoResult:
    info: object
    generation: object
    load_s: float


def _render_info(info) -> Table:
    t = Table(title=f"model {info.spec}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("architecture", f"{info.architecture} ({info.model_type})")
    t.add_row("parameters", f"{info.parameters:,} ({info.parameters / 1e6:.1f} M)")
    t.add_row(
        "layers / hidden / ffn", f"{info.layers} / {info.hidden_size} / {info.intermediate_size}"
    )
    t.add_row("heads / kv heads / head dim", f"{info.heads} / {info.kv_heads} / {info.head_dim}")
    t.add_row("vocab", f"{info.vocab_size:,}")
    t.add_row("dtype / bytes", f"{info.dtype} / {info.bytes / 2**20:.1f} MiB")
    if info.gguf_file:
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(info.gguf_type_counts.items()))
        t.add_row("GGUF tensor types", counts)
        if info.prequantized:
            t.add_row(
                "note",
                f"the weights were already {info.prequantized} in the GGUF file; joules "
                "dequantized them to float, so 'fp32' here means fp32 copies of "
                f"{info.prequantized} values",
            )
    t.add_row("source", info.source)
    return t


def _render(r: DemoResult) -> None:
    console.print(_render_info(r.info))
    g = r.generation
    console.print(
        Panel(
            f"[dim]{g.prompt}[/][bold]{g.text}[/]",
            title=f"greedy generation: {g.new_tokens} new tokens after {g.prompt_tokens} prompt tokens",
        )
    )
    console.print(
        f"load {r.load_s:.1f} s; generation {g.latency_s:.2f} s = "
        f"[bold]{g.tokens_per_s:.1f} tokens/s[/] (batch 1, greedy, fp32, CPU threads as set by torch)"
    )


def _wikitext_prompt(words: int = 48) -> str:
    from joules.data import load_text

    text = load_text("wikitext2", "test")
    # The first article's opening, skipping the " = Title = " heading line.
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")
    ]
    return " ".join(lines[0].split()[:words])


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model spec (preset, HF dir or .gguf)."),
    new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    json: bool = JSON_OPTION,
) -> None:
    """Run the main job end to end on the embedded default model."""
    import time

    from joules.models import load_model
    from joules.models.generate import generate_timed

    with console.status(f"loading {model} (the first load converts the GGUF file, ~20 s)"):
        t0 = time.perf_counter()
        m, tok, info = load_model(model)
        load_s = time.perf_counter() - t0
    with console.status(f"generating {new_tokens} tokens"):
        gen = generate_timed(m, tok, _wikitext_prompt(), new_tokens)
    emit(DemoResult(info, gen, load_s), json, _render)
