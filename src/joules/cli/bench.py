"""``joules bench``: latency, throughput, memory and J/token, prefill and decode apart.

    $ joules bench smollm2-135m
    $ joules bench smollm2-135m --prompt-len 128,512 --batch 1,4 --gen-len 64 --repeats 5
    $ joules bench smollm2-135m --runtime compiled --threads 2 --json
    $ joules bench out.gguf --runtime llamacpp   # llama.cpp on the file (the [llamacpp] extra)
    $ joules bench --probe                  # this machine's bandwidth and peak FLOP/s (cached)
    $ joules bench --list-runtimes          # every registered runtime

Each row: TTFT and TPOT (median and 95 % interval), tokens/s of each phase with its fraction of
the speed of light, peak RSS, KV-cache bytes, and each phase's J/token, power and method.
"""

from __future__ import annotations

import dataclasses
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
    large_model_file,
    list_option,
    parse_ints,
    progress_bar,
)
from joules.errors import ConfigError


def _pct(x: float | None) -> str:
    return f"{100 * x:.0f} %" if x is not None else "-"


def render_limits(lim: Any) -> None:
    t = Table(title=f"machine limits ({lim.threads} threads)", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("CPU", escape(lim.cpu_model))
    t.add_row("read bandwidth", f"{lim.read_bw_bytes_s / 1e9:.2f} GB/s")
    t.add_row("triad bandwidth", f"{lim.triad_bw_bytes_s / 1e9:.2f} GB/s")
    for k, v in lim.peak_flops.items():
        t.add_row(f"peak matmul {k}", f"{v / 1e9:.2f} GFLOP/s")
    t.add_row("buffer / matmul n", f"{lim.buffer_bytes >> 20} MiB / {lim.matmul_n}")
    console.print(t)


def render_bench(res: Any) -> None:
    paths = ", ".join(f"{k} ×{v}" for k, v in sorted(res.linear_paths.items())) or "-"
    console.print(
        f"[bold]{escape(res.model)}[/] · runtime {res.runtime} · compute {res.compute_dtype} · "
        f"{res.threads} threads · linears: {escape(paths)}",
        highlight=False,
    )
    pre = res.model_info.get("prequantized")
    if pre:
        console.print(f"(weights were {pre} before joules loaded them)", highlight=False)
    if res.model_info.get("synthetic"):
        console.print(f"[yellow]note:[/] {res.model_info['synthetic']}", highlight=False)
    t = Table(
        title="latency and throughput (medians ± half the 95 % interval)", title_justify="left"
    )
    for col in (
        "P×B",
        "TTFT ms",
        "TPOT ms",
        "p50/p90 ms",
        "prefill tok/s",
        "SoL",
        "decode tok/s",
        "SoL",
    ):
        t.add_column(col, justify="right")
    e = Table(title="memory and energy (per phase: J/token, average power)", title_justify="left")
    for col in (
        "P×B",
        "peak RSS MiB",
        "KV MiB",
        "prefill J/tok",
        "W",
        "decode J/tok",
        "W",
        "method",
    ):
        e.add_column(col, justify="right")
    for r in res.rows:
        half_ttft = (r.ttft_s.ci95_high - r.ttft_s.ci95_low) / 2
        half_tpot = (r.tpot_s.ci95_high - r.tpot_s.ci95_low) / 2
        pb = f"{r.prompt_len}×{r.batch}"
        t.add_row(
            pb,
            f"{1e3 * r.ttft_s.median:.1f}±{1e3 * half_ttft:.1f}",
            f"{1e3 * r.tpot_s.median:.2f}±{1e3 * half_tpot:.2f}",
            f"{1e3 * r.tpot_p50_s:.1f}/{1e3 * r.tpot_p90_s:.1f}",
            f"{r.prefill_tok_s:.0f}",
            _pct(r.prefill_sol_fraction),
            f"{r.decode_tok_s:.1f}",
            _pct(r.decode_sol_fraction),
        )
        pe, de = r.prefill_energy, r.decode_energy
        e.add_row(
            pb,
            f"{r.peak_rss_bytes / 2**20:.0f}",
            f"{r.kv_bytes / 2**20:.2f}",
            f"{pe.j_per_token:.4f}" if pe else "-",
            f"{pe.avg_power_w:.1f}" if pe else "-",
            f"{de.j_per_token:.4f}" if de else "-",
            f"{de.avg_power_w:.1f}" if de else "-",
            de.method if de else "off",
        )
    console.print(t)
    console.print(e)
    if res.limits:
        lim = res.limits
        console.print(
            f"speed of light: decode = bytes per step ÷ {lim['read_bw_bytes_s'] / 1e9:.2f} GB/s "
            f"read bandwidth; prefill = FLOPs ÷ {lim['peak_flops'].get(res.compute_dtype, 0) / 1e9:.1f}"
            f" GFLOP/s peak {res.compute_dtype} matmul (probed, {lim['threads']} threads)",
            highlight=False,
        )
    for note in res.notes:
        console.print(f"note: {escape(note)}", highlight=False)


def _list_runtimes(value: bool) -> None:
    """``--list-runtimes``: every registered runtime, read from the registry when asked
    (importing the runtimes imports torch, which ``joules --help`` must not)."""
    if not value:
        return
    from joules.bench import get_runtime, runtime_names

    t = Table(title="runtimes (joules bench --runtime NAME)", title_justify="left")
    t.add_column("runtime", no_wrap=True)
    t.add_column("runs", no_wrap=True)
    t.add_column("what it is")
    for name in runtime_names():
        cls = get_runtime(name)
        runs = "a torch model" if cls.takes_torch_model else "its own file (not in a sweep)"
        t.add_row(name, runs, escape(doc_line(cls)))
    console.print(t)
    raise typer.Exit()


@app.command("bench")
def bench_cmd(
    model: str = typer.Argument("smollm2-135m", help="Model spec (preset, HF dir, .gguf, DIR)."),
    prompt_len: str = typer.Option("128", "--prompt-len", help="Prompt lengths, e.g. 128,512."),
    gen_len: int = typer.Option(64, "--gen-len", help="Tokens generated per run (first included)."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,4."),
    repeats: int = typer.Option(5, "--repeats", help="Measured runs per row."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs per row first."),
    runtime: str = typer.Option(
        None,
        "--runtime",
        help="A registered runtime (--list-runtimes lists them all). Default: eager, or "
        "llamacpp for a model of 3B parameters or more that it can run (said on stderr).",
    ),
    threads: int = typer.Option(None, "--threads", help="Torch threads (default: unchanged)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as loaded), fp32 or bf16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt offsets."),
    no_energy: bool = typer.Option(False, "--no-energy", help="Run without the meter."),
    probe: bool = typer.Option(False, "--probe", help="Measure this machine's limits and exit."),
    as_json: bool = JSON_OPTION,
    list_runtimes: bool = list_option("--list-runtimes", _list_runtimes, "runtimes"),
) -> None:
    """Latency, throughput, memory and joules per token, prefill and decode apart."""
    from joules.bench import BenchConfig, check_workload, probe_machine, run_bench

    if probe:
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        with console.status("probing memory bandwidth and matmul FLOP/s"):
            lim = probe_machine(threads)
        emit(lim, as_json, render_limits)
        return
    cfg = BenchConfig(
        prompt_lens=tuple(parse_ints(prompt_len, "--prompt-len")),
        gen_len=gen_len,
        batch_sizes=tuple(parse_ints(batch, "--batch")),
        repeats=repeats,
        warmup=warmup,
        runtime=runtime or "eager",
        threads=threads,
        seed=seed,
        dtype=dtype,
        energy=not no_energy,
    )
    cfg.validate()  # before loading anything
    if runtime is None:  # a large model that llama.cpp can run runs there (said on stderr)
        gguf = large_model_file(model)
        if gguf is not None:
            model, cfg = gguf, dataclasses.replace(cfg, runtime="llamacpp")
            cfg.validate()
    from joules.bench import get_runtime

    m, tok, info = get_runtime(cfg.runtime).load(model)  # llamacpp: the .gguf path itself
    check_workload(info, cfg)
    with progress_bar(f"bench {cfg.runtime}", as_json) as update:
        res = run_bench(m, tok, info, cfg, progress=update)
    emit(res, as_json, render_bench)
