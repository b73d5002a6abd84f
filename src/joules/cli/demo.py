"""``joules demo``: the main job end to end on the embedded default model (what `make demo` runs).

Stages so far: load the model and show its ModelInfo; generate from a WikiText-2 prompt inside
an energy window (tokens/s, joules per token, method and uncertainty); run every linear weight
through a few number formats (bits/element, SQNR; ``uint4-asym-g32`` must reproduce the Q4_1
weights of the default model); WikiText-2 test perplexity on a slice for the model as loaded
(inside an energy window) and for its weights emulated in a few formats. Each later capability
extends this until it is the whole pipeline. Every number printed here was computed in this run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit


@dataclass
class DemoResult:
    info: Any
    load_s: float
    generation: Any
    generation_energy: Any
    formats: list[Any]
    perplexity: list[tuple[str, Any]]
    perplexity_energy: Any
    predictions: list[Any] | None = None  # joules predict: this machine and H100, same workload

    @property
    def energy_j_per_token(self) -> float:
        return self.generation_energy.energy_j / max(self.generation.new_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "load_s": self.load_s,
            "generation": self.generation,
            "generation_energy": self.generation_energy,
            "energy_j_per_token": self.energy_j_per_token,
            "formats": self.formats,
            "perplexity": [{"weights": name, **r.to_dict()} for name, r in self.perplexity],
            "perplexity_energy": self.perplexity_energy,
            "predictions": self.predictions,
        }


def render_info(info: Any) -> Table:
    """A ModelInfo as a rich table, with the note on pre-quantized GGUF weights."""
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
    from joules.cli.measure import measurement_line

    console.print(render_info(r.info))
    g = r.generation
    console.print(
        Panel(
            f"[dim]{g.prompt}[/][bold]{g.text}[/]",
            title=f"greedy generation: {g.new_tokens} new tokens after {g.prompt_tokens} prompt tokens",
        )
    )
    console.print(
        f"load {r.load_s:.1f} s; generation {g.latency_s:.2f} s = "
        f"[bold]{g.tokens_per_s:.1f} tokens/s[/] (batch 1, greedy, {r.info.dtype})"
    )
    e = r.generation_energy
    console.print(
        f"energy of the generation: {measurement_line(e)}; "
        f"[bold]{r.energy_j_per_token:.3g} J/token[/] ({e.method})"
    )
    _render_predictions(r)
    _render_formats(r.formats, r.info)
    _render_perplexity(r)


def _render_predictions(r: DemoResult) -> None:
    if not r.predictions:
        return
    g = r.generation
    parts = []
    for p in r.predictions:
        tok_s = g.new_tokens / p.total_s
        band = p.band.get("decode")
        how = f"calibrated, ±{band:.0%}" if band is not None else "uncalibrated speed of light"
        parts.append(
            f"{p.hardware} ({p.weight_format}): {tok_s:.1f} tokens/s, "
            f"{p.j_per_token:.3g} J/token [{how}]"
        )
    console.print("predicted for the same workload (joules predict): " + "; ".join(parts))


def _render_formats(rows: list[Any], info: Any) -> None:
    t = Table(title="every linear weight through number formats (emulated)", title_justify="left")
    for col in ("format", "bits/elem", "SQNR dB", "max abs err", "clipped %"):
        t.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        t.add_row(
            r.format,
            f"{r.bits_per_element:.3f}",
            f"{r.sqnr_db:.2f}",
            f"{r.max_abs_error:.3g}",
            f"{100 * r.frac_clipped:.3f}",
        )
    console.print(t)
    if info.prequantized:
        console.print(
            f"[dim]The weights were {info.prequantized} already: uint4-asym-g32 (the same "
            "layout: 4-bit codes, fp16 scale and minimum per 32) should reproduce them, and its "
            "remaining error comes from tensors stored otherwise (the Q8_0 lm_head).[/]"
        )


def _render_perplexity(r: DemoResult) -> None:
    from joules.cli.measure import measurement_line

    proto = r.perplexity[0][1].protocol
    t = Table(
        title=f"WikiText-2 test perplexity, first {r.perplexity[0][1].tokens_scored} tokens "
        f"scored (window {proto.window}, stride {proto.stride})",
        title_justify="left",
    )
    for col in ("weights", "perplexity", "95 % interval", "bits/byte", "tokens/s"):
        t.add_column(col, justify="left" if col == "weights" else "right")
    for name, p in r.perplexity:
        lo, hi = p.perplexity_ci95
        t.add_row(
            name,
            f"{p.perplexity:.3f}",
            f"{lo:.2f}-{hi:.2f}",
            f"{p.bits_per_byte:.4f}",
            f"{p.tokens_per_s:.0f}",
        )
    console.print(t)
    e = r.perplexity_energy
    per_tok = e.energy_j / max(r.perplexity[0][1].tokens_scored, 1)
    console.print(
        f"energy of the first perplexity run: {measurement_line(e)}; "
        f"[bold]{per_tok:.3g} J/token scored[/] ({e.method}). Emulated formats run in float, so "
        "their speed and energy are not those of a real low-bit kernel: only their quality is."
    )


def _wikitext_prompt(words: int = 48) -> str:
    from joules.data import load_text

    text = load_text("wikitext2", "test")
    # The first article's opening, skipping the " = Title = " heading line.
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")
    ]
    return " ".join(lines[0].split()[:words])


# Perplexity variants: the GGUF-exact layout (should match the model as loaded) and two
# 4-bit formats that are not.
PPL_FORMATS = ("uint4-asym-g32", "int4-g32", "mxfp4")


def _ppl(model: Any, tok: Any, limit_tokens: int) -> Any:
    from joules.evaluate import wikitext2_perplexity

    # Windows of 512 give 8 windows in the default 4096-token slice: a usable interval.
    return wikitext2_perplexity(model, tok, split="test", window=512, limit_tokens=limit_tokens)


# Cheap formats that tell the story: 8-bit baselines, the GGUF-exact layout, OCP MX and NxFP.
DEMO_FORMATS = ("int8-ch", "mxfp8-e4m3", "uint4-asym-g32", "int4-g32", "mxfp4", "nxfp4")


def _predict(model: Any, gen: Any) -> list[Any] | None:
    """The predictor's view of the generation just measured: this machine and an H100."""
    from joules.errors import JoulesError
    from joules.predict import ModelShape, Workload, predict

    try:
        shape = ModelShape.from_config(model.config, name="demo model")
        wl = Workload(prompt_len=max(gen.prompt_tokens, 1), gen_len=max(gen.new_tokens, 1))
        dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
        fmt = dtype.get(str(next(model.parameters()).dtype), "fp32")
        return [
            predict(shape, "this-machine", wl, weight_format=fmt),
            predict(shape, "h100", wl, weight_format="bf16"),
        ]
    except JoulesError as exc:  # e.g. no probe and an uncatalogued CPU: the demo goes on
        console.print(f"[dim]no prediction: {exc}[/]")
        return None


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model spec (preset, HF dir or .gguf)."),
    new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    ppl_tokens: int = typer.Option(
        4096, min=2, help="WikiText-2 test tokens to score (the full split is ~312k: ~17 min)."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Run the main job end to end on the embedded default model."""
    import time

    from joules.evaluate.deviation import format_transform, transformed_copy
    from joules.formats import compare_formats
    from joules.measure import detect_meter
    from joules.models import load_model
    from joules.models.generate import generate_timed

    with console.status(f"loading {model} (the first load converts the GGUF file, ~20 s)"):
        t0 = time.perf_counter()
        m, tok, info = load_model(model)
        load_s = time.perf_counter() - t0
    prompt = _wikitext_prompt()
    ppl: list[tuple[str, Any]] = []
    meter = detect_meter()
    try:
        with console.status(f"generating {new_tokens} tokens inside an energy window"):
            generate_timed(m, tok, prompt, new_tokens=1)  # warm-up, outside the window
            with meter.window("generate") as w:
                gen = generate_timed(m, tok, prompt, new_tokens, warmup=False)
        with console.status("running every linear weight through number formats"):
            fmt_rows = compare_formats(m, DEMO_FORMATS)
        status = f"WikiText-2 perplexity of the model as loaded ({info.dtype})"
        with console.status(status), meter.window("perplexity") as pw:
            ppl.append((f"{info.dtype} as loaded", _ppl(m, tok, ppl_tokens)))
    finally:
        meter.close()
    for spec in PPL_FORMATS:
        with console.status(f"WikiText-2 perplexity with weights in {spec} (emulated)"):
            variant = transformed_copy(m, format_transform(spec))
            ppl.append((f"{spec} (emulated)", _ppl(variant, tok, ppl_tokens)))
            del variant
    result = DemoResult(
        info, load_s, gen, w.measurement, fmt_rows, ppl, pw.measurement, _predict(m, gen)
    )
    emit(result, json, _render)
