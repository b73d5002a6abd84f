"""``joules compress``: apply a recipe to a model and write a compressed directory.

    $ joules compress smollm2-135m --recipe "gptq(format=int4-g64)" -o out/
    $ joules compress smollm2-135m --recipe "rtn(format=int8-ch)" -o int8/ --json
    $ joules compress smollm2-135m --recipe recipe.toml -o out/ --calib-n 64 --calib-len 256
    $ joules eval out/ --task wikitext2
    $ joules compress --list-steps      # every registered step and its keyword arguments

Calibration (for steps that need it): ``--calib-n`` random windows of ``--calib-len`` tokens of
WikiText-2 **valid**, seeded by ``--seed`` (never the test split).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from joules.cli._app import (
    JSON_OPTION,
    app,
    console,
    doc_line,
    emit,
    err_console,
    list_option,
    rich_progress,
)
from joules.errors import ConfigError


def _render(result: dict[str, Any]) -> None:
    m = result["manifest"]
    t = Table(title=escape(f"{m['recipe']} -> {result['output']}"), title_justify="left")
    for col in ("layer", "method", "format", "bits/weight", "bytes"):
        t.add_column(col, justify="left" if col in ("layer", "method", "format") else "right")
    layers = list(m["layers"].items())
    shown = layers if len(layers) <= 14 else [*layers[:7], ("...", {}), *layers[-6:]]
    for name, e in shown:
        t.add_row(
            escape(name),
            str(e.get("method", "")),
            escape(str(e.get("format", ""))),
            f"{e['bits_per_weight']:.4g}" if "bits_per_weight" in e else "",
            f"{e['nbytes']:,}" if "nbytes" in e else "",
        )
    console.print(t)
    bpw = m["bits_per_weight"]
    console.print(
        f"targeted linears: [bold]{bpw:.4g} bits/weight[/] over {m['targeted_parameters']:,} weights"
        if bpw is not None
        else "no linear was quantized"
    )
    console.print(
        f"whole model: {m['model_bytes']:,} bytes ({m['model_bits_per_weight']:.3g} bits/parameter)"
    )
    for s in m["steps"]:
        console.print(
            f"step {s['name']}: {s['time_s']:.1f} s, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    if result.get("timings_s"):
        ts = result["timings_s"]
        console.print(f"load {ts['load']:.1f} s, save {ts['save']:.1f} s")
    if m.get("prequantized"):
        console.print(
            f"[yellow]note:[/] the source weights were {m['prequantized']} before joules saw them"
        )
    if m.get("synthetic"):
        console.print(f"[yellow]note:[/] {m['synthetic']}")
    if m.get("calibration"):
        c = m["calibration"]
        console.print(
            f"calibration: {c['n']} x {c['length']} tokens of {c['dataset']} {c['split']} "
            f"(seed {c['seed']}, sha256 {c['sha256'][:12]})"
        )
    for note in m.get("notes", []):
        console.print(f"note: {escape(note)}")


def _predict(info: Any, recipe: Any, calib_n: int, calib_len: int, layered: bool, out: Any) -> Any:
    """Say the predicted time and peak memory before compressing; refuse in one line when the
    peak will not fit the memory available, naming what would."""
    import psutil

    from joules.predict.compress_cost import (
        config_from_info,
        fitting_calibration,
        load_unit_costs,
        predict_compress,
    )

    if not recipe.steps:
        return None
    cfg = config_from_info(info)
    with out.status("probing this machine's compression rates (once)"):
        costs = load_unit_costs()
    p = predict_compress(cfg, recipe, calib_n=calib_n, calib_len=calib_len, layered=layered,
                         costs=costs)  # fmt: skip
    available = int(psutil.virtual_memory().available)
    gib = 2**30
    if p.peak_rss_bytes > available:
        fixes = []
        n = fitting_calibration(cfg, recipe, calib_n, calib_len, available, layered, costs)
        if n is not None and n < calib_n:
            fixes.append(f"--calib-n {n}")
        if not layered:
            lp = predict_compress(cfg, recipe, calib_n=calib_n, calib_len=calib_len,
                                  layered=True, costs=costs)  # fmt: skip
            if lp.peak_rss_bytes <= available:
                fixes.append("--layered")
        fixes.append(f"a machine with {p.peak_rss_bytes / gib:.1f} GiB free")
        raise ConfigError(
            f"compressing {info.spec} needs about {p.peak_rss_bytes / gib:.1f} GiB (predicted) "
            f"and {available / gib:.1f} GiB is available: use {' or '.join(fixes)}"
        )
    minutes, seconds = divmod(round(p.time_s), 60)
    time_text = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    if p.unmodelled_steps:
        time_text += f" + {', '.join(p.unmodelled_steps)} (no cost model)"
    out.print(
        f"[dim]predicted: {time_text}, peak RSS {p.peak_rss_bytes / gib:.2f} GiB "
        f"({'layer by layer' if layered else 'in memory'}, {p.calib_tokens:,} calibration "
        "tokens; from this machine's probe)[/]"
    )
    return p


def _list_steps(value: bool) -> None:
    """``--list-steps``: every registered compression step with its recipe arguments, read
    from the registry when asked (importing the steps imports torch, which ``joules --help``
    must not)."""
    if not value:
        return
    import dataclasses

    import joules.deploy  # noqa: F401  (registers the llamacpp(ftype=...) peer step)
    from joules.compress import step_names
    from joules.compress.recipe import step_class

    t = Table(title='steps (joules compress -r "NAME(key=value, ...)")', title_justify="left")
    t.add_column("step", no_wrap=True)
    t.add_column("arguments")
    t.add_column("what it does")
    for name in step_names():
        cls = step_class(name)
        args = ", ".join(f.name for f in dataclasses.fields(cls))
        t.add_row(name, escape(args), escape(doc_line(cls)))
    console.print(t)
    raise typer.Exit()


@app.command("compress")
def compress_cmd(
    model: str = typer.Argument(..., help="Model spec: smollm2-135m, an HF directory or .gguf."),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        "-r",
        help='Registered steps joined by "|", e.g. "gptq(format=int4-g64)" (--list-steps '
        "lists them), or a TOML file.",
    ),
    target_size: str | None = typer.Option(
        None,
        "--target-size",
        help="Whole GGUF file size, e.g. 80MB or 86.5MiB: one GGUF type per tensor chosen "
        "under it (gguf_mix), then GPTQ; a --recipe runs before it (e.g. awq scales).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
    calib_n: int = typer.Option(128, "--calib-n", help="Calibration sequences."),
    calib_len: int = typer.Option(256, "--calib-len", help="Tokens per calibration sequence."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    layered: bool | None = typer.Option(
        None,
        "--layered/--in-memory",
        help="Read one decoder block at a time from the checkpoint and write it to its own shard "
        "(default when the checkpoint exceeds a quarter of the available memory and every step "
        "runs so), or load the whole model.",
    ),
    as_json: bool = JSON_OPTION,
    list_steps: bool = list_option("--list-steps", _list_steps, "compression steps"),
) -> None:
    """Compress MODEL with a recipe and save it (safetensors + joules.json manifest)."""
    import joules.deploy  # noqa: F401  (registers the llamacpp(ftype=...) peer step)
    from joules.compress import calibration_tokens, compress, parse_recipe
    from joules.compress.offload import load_layered, wants_layered
    from joules.models import load_model

    out_console = err_console if as_json else console
    plan = None
    if target_size is not None:
        from joules.deploy.size import parse_size, size_plan

        target = parse_size(target_size)  # a bad size fails before anything loads
        with out_console.status(f"measuring {model}'s fixed GGUF bytes"):
            plan = size_plan(model, target)
        mix = f"gguf_mix(bytes={plan.budget_bytes})"
        recipe = f"{recipe} | {mix}" if recipe else mix
    if recipe is None:
        raise ConfigError("give --recipe (e.g. 'gptq(format=gguf-q4_0)') or --target-size 80MB")
    parsed = parse_recipe(recipe)  # fail on a bad recipe before loading anything
    offload = None
    if layered is None:
        layered = wants_layered(model, parsed)
    t_load = time.perf_counter()
    with out_console.status(f"loading {model}" + (" (layer by layer)" if layered else "")):
        if layered:
            output.resolve().parent.mkdir(parents=True, exist_ok=True)
            lm = load_layered(model, work_root=output.resolve().parent)
            m, tok, info, offload = lm.model, lm.tokenizer, lm.info, lm.offload
        else:
            m, tok, info = load_model(model)
    timings_s = {"load": time.perf_counter() - t_load}
    prediction = _predict(info, parsed, calib_n, calib_len, layered, out_console)
    calib, calib_info = None, None
    if parsed.needs_calibration:
        calib, calib_info = calibration_tokens(
            tok, calib_n, calib_len, seed, max_length=info.max_position_embeddings or None
        )
    with rich_progress(as_json) as bar:
        tasks: dict[str, Any] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        cm = compress(
            m,
            parsed,
            calibration=calib,
            tokenizer=tok,
            calibration_info=calib_info,
            source=model,
            prequantized=info.prequantized,
            progress=progress,
            offload=offload,
        )
    if plan is not None:
        planned = dict(cm.manifest.gguf_export or {})
        planned.update(target_bytes=plan.target_bytes, size_plan=plan.to_dict())
        if plan.output:
            planned["output"] = plan.output
        cm.manifest.gguf_export = planned
    timings_s["compress"] = sum(float(s["time_s"]) for s in cm.manifest.steps)
    t_save = time.perf_counter()
    cm.save(output, tok)
    timings_s["save"] = time.perf_counter() - t_save
    result = {
        "output": str(output),
        "manifest": cm.manifest.to_dict(),
        "timings_s": timings_s,
        "prediction": prediction.to_dict() if prediction is not None else None,
    }
    emit(result, as_json, _render)
