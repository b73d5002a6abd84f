"""``joules eval``: perplexity, multiple-choice accuracy, deviation and attention stability.

    $ joules eval smollm2-135m --task wikitext2 --limit-tokens 4096
    $ joules eval smollm2-135m --task wikitext2 --window 1024 --stride 512 --json
    $ joules eval smollm2-135m --task hellaswag --limit 2000
    $ joules eval mine.gguf --task deviation --reference smollm2-135m
    $ joules eval q4_0.gguf --task deviation --reference f32.gguf --runtime llamacpp \
          --scored second-half --window 512 --limit-tokens 4096     # llama-perplexity's KLD
    $ joules eval smollm2-135m --task deviation --weights-format mxfp4 --limit-tokens 8192
    $ joules eval --task attention-deviation --seq-lens 128,1024 --dtypes bf16
    $ joules eval --list-tasks      # every registered task (a new one is one class: see extending)

``--runtime llamacpp`` runs a ``.gguf`` file in llama.cpp: ``wikitext2`` on the torch path's
windows, ``deviation`` as KL divergence from ``--reference`` (a ``.gguf`` runs in llama.cpp too,
a directory in torch fp32), its log-probs stored once per file and protocol as
``llama-perplexity --kl-divergence-base`` stores them (see :mod:`joules.evaluate.kld`).

``--data`` replaces the shipped set (a UTF-8 text file for wikitext2/deviation, a JSONL file of
``{"context", "endings", "label"}`` for hellaswag). Every result prints its protocol.

The compute path is fixed, never a speed probe's: the model runs in fp32 unless ``--dtype`` says
otherwise (``--dtype auto`` picks by a speed probe and says so in ``protocol.dtype_choice``), and
compressed linears take fp32 activations (``protocol.activation_dtype``, ``compute_path``), so
a figure is the same on an idle and a loaded machine and matches the library's
``load_model(spec, dtype=torch.float32)`` + ``joules.evaluate``.
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
    err_console,
    large_model_file,
    list_option,
    parse_ints,
    progress_bar,
)
from joules.errors import ConfigError


def _list_tasks(value: bool) -> None:
    """``--list-tasks``: every registered task, read from the registry when asked (importing
    the tasks imports torch, which ``joules --help`` must not)."""
    if not value:
        return
    from joules.evaluate import tasks as eval_tasks

    t = Table(title="tasks (joules eval --task NAME)", title_justify="left")
    t.add_column("task", no_wrap=True)
    for col in ("needs a model", "progress", "what it measures"):
        t.add_column(col)
    for name in eval_tasks.names():
        cls = eval_tasks.task_class(name)
        t.add_row(
            name, "yes" if cls.needs_model else "no", cls.progress_unit, escape(doc_line(cls))
        )
    console.print(t)
    raise typer.Exit()


def _printer(cls: Any) -> Any:
    """Print a result of task class ``cls`` through its ``render``."""
    return lambda result: console.print(cls.render(result))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument("smollm2-135m", help="Model spec (preset, HF dir or .gguf)."),
    task: str = typer.Option(
        ..., "--task", help="A registered task, e.g. wikitext2 (--list-tasks lists them all)."
    ),
    reference: str = typer.Option(
        None, "--reference", help="deviation: the reference model (default: MODEL itself)."
    ),
    weights_format: str = typer.Option(
        None,
        "--weights-format",
        help="deviation: fake-quantize MODEL's decoder linear weights to this format (emulated); "
        "attention-deviation: comma-separated formats to emulate besides --dtypes.",
    ),
    data: str = typer.Option(
        None, "--data", help="A text file (wikitext2, deviation) or JSONL (hellaswag) to use."
    ),
    split: str = typer.Option("test", help="wikitext2 split: test (evaluate) or valid."),
    limit_tokens: int = typer.Option(None, "--limit-tokens", help="Evaluate the first N tokens."),
    limit: int = typer.Option(None, "--limit", help="hellaswag: N items drawn with --seed."),
    window: int = typer.Option(1024, help="Context window in tokens."),
    stride: int = typer.Option(None, help="Stride in tokens (default: the window)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Windows per forward pass."),
    dtype: str = typer.Option(
        None,
        help="Compute dtype: fp32 (default: quality figures never depend on a speed probe), "
        "bf16, or auto (bf16 where a speed probe finds it faster here; recorded in the "
        "protocol's dtype_choice).",
    ),
    bos: bool = typer.Option(None, "--bos/--no-bos", help="Prepend BOS (default: tokenizer's)."),
    seed: int = typer.Option(1234, help="hellaswag --limit sampling / attention inputs seed."),
    kv_reuse: bool = typer.Option(
        True, "--kv-reuse/--no-kv-reuse", help="hellaswag: score the context once (KV cache)."
    ),
    sqnr: str = typer.Option("linear", help="deviation: SQNR per linear, block, or none."),
    scored: str = typer.Option(
        "all",
        help="deviation: all (non-overlapping windows) or second-half (llama-perplexity's "
        "chunks of --window, the second half of each scored).",
    ),
    seq_lens: str = typer.Option(
        "128,256,512,1024,2048,4096", "--seq-lens", help="attention-deviation lengths."
    ),
    block_sizes: str = typer.Option("64,128", "--block-sizes", help="flash-style block sizes."),
    dtypes: str = typer.Option("fp32,bf16,fp16", help="attention-deviation dtypes."),
    heads: int = typer.Option(4, help="attention-deviation heads (head dim 64)."),
    threads: int = typer.Option(None, help="CPU threads (default: all cores)."),
    runtime: str = typer.Option(
        None,
        help="wikitext2, deviation: torch, or llamacpp (a .gguf file; the [llamacpp] extra). "
        "Default: llamacpp for a model of 3B parameters or more that it can run (a .gguf file, "
        "or a compressed directory's GGUF export; said on stderr), else torch.",
    ),
    json: bool = JSON_OPTION,
    list_tasks: bool = list_option("--list-tasks", _list_tasks, "tasks"),
) -> None:
    """Evaluate MODEL: perplexity, HellaSwag accuracy, deviation or attention stability."""
    if runtime is None:
        runtime = "torch"
        gguf = large_model_file(model) if task in ("wikitext2", "deviation") else None
        if gguf is not None:
            model, runtime = gguf, "llamacpp"
    if runtime != "torch":
        if task == "deviation":
            _deviation_file(model, runtime, reference, data, split, limit_tokens, window, bos,
                            scored, threads, json)  # fmt: skip
            return
        _eval_llamacpp(
            model, task, runtime, data, split, limit_tokens, window, stride, bos, threads, json
        )
        return
    from joules.evaluate import tasks as eval_tasks
    from joules.evaluate.scoring import set_threads
    from joules.runtime_dtype import CHOICES, resolve_dtype

    cls = eval_tasks.task_class(task)
    requested = dtype or cls.default_dtype
    if requested not in CHOICES:
        raise ConfigError(f"--dtype must be one of {', '.join(CHOICES)}, got {requested!r}")
    set_threads(threads)
    flags: dict[str, Any] = {
        "reference": reference,
        "weights_format": weights_format,
        "data": data,
        "split": split,
        "limit_tokens": limit_tokens,
        "limit": limit,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "add_bos": bos,
        "seed": seed,
        "kv_reuse": kv_reuse,
        "sqnr": sqnr,
        "scored": scored,
        "heads": heads,
    }
    accepted = set(eval_tasks.options(task))
    if "seq_lens" in accepted:  # list-valued flags, parsed here so errors name the flag
        flags["seq_lens"] = parse_ints(seq_lens, "--seq-lens")
        flags["block_sizes"] = parse_ints(block_sizes, "--block-sizes")
        flags["dtypes"] = [d.strip() for d in dtypes.split(",") if d.strip()]
    config = eval_tasks.get(
        task, **{k: v for k, v in flags.items() if k in accepted and v is not None}
    )
    m = tok = info = choice = None
    if cls.needs_model:
        from joules.models import load_model

        choice = resolve_dtype(requested)
        if choice.requested == "auto":
            err_console.print(f"[dim]dtype {choice.name} ({escape(choice.reason)})[/]")
        with console.status(f"loading {model}"):
            m, tok, info = load_model(model, dtype=choice.dtype)
        if info.synthetic:
            err_console.print(f"[yellow]note:[/] {info.synthetic}")
    with progress_bar(cls.progress_unit, json) as prog:
        r = config.run(m, tok, info, progress=prog)
    if choice is not None:
        r = _with_dtype_choice(r, choice, default=dtype is None)
    emit(r, json, _printer(cls))
    if m is not None:
        _print_paths(m, json)


def _with_dtype_choice(r: Any, choice: Any, default: bool) -> Any:
    """``r`` with its protocol saying how the model's dtype was chosen (a task whose result
    has no ``protocol.dtype_choice`` is returned as it is)."""
    p = getattr(r, "protocol", None)
    fields = {f.name for f in dataclasses.fields(p)} if dataclasses.is_dataclass(p) else set()
    if "dtype_choice" not in fields or not dataclasses.is_dataclass(r):
        return r
    if choice.requested == "auto":
        how = choice.reason
    else:
        how = f"{choice.name} ({'default' if default else 'requested'})"
    return dataclasses.replace(r, protocol=dataclasses.replace(r.protocol, dtype_choice=how))


def _print_paths(model: Any, as_json: bool) -> None:
    """Say how a compressed model's linears ran (real kernel and its activation dtype, or
    emulated) in the last forward."""
    from joules.compress import linear_paths

    paths = linear_paths(model)
    if paths and not as_json:
        ran = ", ".join(f"{n} x {p}" for p, n in sorted(paths.items()))
        console.print(f"[dim]compressed linears ran as: {escape(ran)}[/]")


def _eval_llamacpp(
    model: str,
    task: str,
    runtime: str,
    data: str | None,
    split: str,
    limit_tokens: int | None,
    window: int,
    stride: int | None,
    bos: bool | None,
    threads: int | None,
    json: bool,
) -> None:
    """Perplexity of a GGUF file under llama.cpp, on the torch path's windows and protocol."""
    from joules.data import load_text
    from joules.deploy.llamacpp import llamacpp_perplexity
    from joules.evaluate.tasks import Wikitext2
    from joules.models.loading import load_gguf_meta, resolve

    if runtime != "llamacpp":
        raise ConfigError(f"unknown runtime {runtime!r}: choose torch or llamacpp")
    if task != "wikitext2":
        raise ConfigError(f"--runtime llamacpp runs --task wikitext2 only, not {task!r}")
    kind, path = resolve(model)
    if kind != "gguf":
        raise ConfigError(
            f"--runtime llamacpp needs a .gguf file, got {model}: export it first "
            "(joules export DIR --to gguf -o model.gguf)"
        )
    with (err_console if json else console).status(f"loading the tokenizer of {model}"):
        tok = load_gguf_meta(path).tokenizer  # nothing dequantized: llama.cpp runs the file
    text = load_text(data) if data else load_text("wikitext2", split)
    r = llamacpp_perplexity(
        path,
        tok,
        text,
        window=window,
        stride=stride,
        limit_tokens=limit_tokens,
        add_bos=bos,
        dataset=data or "wikitext2",
        split=None if data else split,
        threads=threads,
    )
    emit(r, json, _printer(Wikitext2))


def _deviation_file(
    model: str,
    runtime: str,
    reference: str | None,
    data: str | None,
    split: str,
    limit_tokens: int | None,
    window: int,
    bos: bool | None,
    scored: str,
    threads: int | None,
    json: bool,
) -> None:
    """KL divergence of a model file under ``runtime`` (llamacpp) from ``--reference``."""
    from joules.evaluate import tasks as eval_tasks
    from joules.models.loading import load_gguf_meta, resolve

    if runtime == "llamacpp":
        from joules.deploy import llamacpp_logits  # noqa: F401  (registers the runtime)
    kind, path = resolve(model)
    if kind != "gguf":
        raise ConfigError(
            f"--runtime {runtime} needs a .gguf file, got {model}: export it first "
            "(joules export DIR --to gguf -o model.gguf)"
        )
    config = eval_tasks.get(
        "deviation",
        reference=reference,
        runtime=runtime,
        data=data,
        split=split,
        limit_tokens=limit_tokens,
        window=window,
        add_bos=bos,
        scored=scored,
        threads=threads,
    )
    with (err_console if json else console).status(f"loading the tokenizer of {model}"):
        tok = load_gguf_meta(path).tokenizer  # nothing dequantized: llama.cpp runs the file
    with progress_bar(eval_tasks.Deviation.progress_unit, json) as prog:
        r = config.run(str(path), tok, None, progress=prog)
    emit(r, json, _printer(eval_tasks.Deviation))
