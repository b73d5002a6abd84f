"""How each task's result reads in a terminal: one rich renderable per result, never printed here.

    >>> import io
    >>> from rich.console import Console
    >>> from joules.evaluate.render import render_fields
    >>> class R:
    ...     def to_dict(self):
    ...         return {"accuracy": 0.5, "n": 4, "protocol": {"seed": 1}}
    >>> out = Console(width=60, file=io.StringIO())
    >>> out.print(render_fields(R(), "mytask"))
    >>> text = out.file.getvalue()
    >>> "accuracy" in text and "protocol: seed 1" in text
    True

A task class names its renderer (``Task.render``), so ``joules eval`` prints a new task's result
without a list to edit; the CLI does the printing (``console.print(task.render(result))``).
:func:`render_fields` is the default: a table of the result's scalar fields and its protocol.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table


def _compute_line(p: Any) -> list[str]:
    """How the model's matmuls ran (compressed kernel or dense), when the protocol says."""
    if not p.compute_path:
        return []
    return [
        f"[dim]compute: {escape(p.compute_path)} · activations {escape(p.activation_dtype)}"
        f" · dtype {escape(p.dtype_choice or getattr(p, 'dtype', '') or '-')}[/]"
    ]


def render_perplexity(r: Any) -> RenderableType:
    p = r.protocol
    t = Table(title=escape(f"perplexity of {p.model} on {p.dataset}"), title_justify="left")
    for col in ("perplexity", "95 % interval", "mean NLL", "bits/byte", "tokens", "tokens/s"):
        t.add_column(col, justify="right")
    lo, hi = r.perplexity_ci95
    t.add_row(
        f"{r.perplexity:.4f}",
        f"{lo:.3f} - {hi:.3f}",
        f"{r.nll_mean:.5f}",
        f"{r.bits_per_byte:.4f}",
        f"{r.tokens_scored:,}",
        f"{r.tokens_per_s:.0f}",
    )
    protocol = (
        f"[dim]protocol: {p.dataset}/{p.split or '-'} · window {p.window} · stride {p.stride} · "
        f"BOS {'yes' if p.add_bos else 'no'} · limit {p.limit_tokens or 'none'} · "
        f"{p.stream_tokens:,} stream tokens in {r.windows} windows · {p.dtype} · "
        f"batch {p.batch_size} · tokenizer {p.tokenizer}[/]"
    )
    return Group(t, protocol, *_compute_line(p))


def render_choice(r: Any) -> RenderableType:
    p = r.protocol
    t = Table(title=escape(f"{p.dataset}: {p.model}"), title_justify="left")
    for col in ("metric", "value", "95 % Wilson interval"):
        t.add_column(col, justify="right")
    for name, value, (lo, hi) in (
        ("acc", r.acc, r.acc_ci95),
        ("acc_norm (per character)", r.acc_norm, r.acc_norm_ci95),
        ("acc_bytes (per UTF-8 byte)", r.acc_bytes, r.acc_bytes_ci95),
    ):
        t.add_row(name, f"{100 * value:.2f} %", f"{100 * lo:.2f} - {100 * hi:.2f} %")
    limit = f"{r.n} of {p.items_total} (seed {p.seed})" if p.limit else f"all {r.n}"
    protocol = (
        f"[dim]protocol: items {limit} · BOS {'yes' if p.add_bos else 'no'} · {p.dtype} · "
        f"KV reuse {'yes' if p.kv_reuse else 'no'} · {r.items_per_s:.2f} items/s[/]"
    )
    return Group(t, protocol, f"[dim]text: {escape(p.text)}[/]", *_compute_line(p))


def render_deviation(r: Any) -> RenderableType:
    """llama-perplexity's ``--kl-divergence`` summary lines, with joules' intervals."""
    p = r.protocol
    t = Table(
        title=escape(f"deviation of {p.model} from {p.reference}"),
        title_justify="left",
        caption="KLD: KL mean, max, p99, median in nats per scored token; Same top p: top-1 "
        "agreement",
        caption_justify="left",
    )
    t.add_column("statistic")
    t.add_column("value", justify="right")
    t.add_column("95 % interval", justify="right")

    def ci(lo: float, hi: float, digits: int) -> str:
        return "" if lo != lo else f"{lo:.{digits}f} - {hi:.{digits}f}"  # NaN: not recorded

    t.add_row("Mean PPL(Q)", f"{r.perplexity_model:.6f}", "")
    t.add_row("Mean PPL(base)", f"{r.perplexity_reference:.6f}", "")
    t.add_row(
        "Mean PPL(Q)/PPL(base)", f"{r.perplexity_ratio:.6f}", ci(r.ppl_ratio_lo, r.ppl_ratio_hi, 6)
    )
    t.add_row("Mean    KLD", f"{r.kl_mean:.6f}", ci(r.kl_lo, r.kl_hi, 6))
    t.add_row("Maximum KLD", f"{r.kl_max:.6f}", "")
    t.add_row("99.0%   KLD", f"{r.kl_p99:.6f}", "")
    t.add_row("Median  KLD", f"{r.kl_median:.6f}", "")
    t.add_row("Same top p", f"{100 * r.top1_agreement:.3f} %", "")
    t.add_row("tokens", f"{r.tokens_scored:,}", f"{getattr(r, 'windows', 0) or '-'} windows")
    parts: list[RenderableType] = [t]
    worst = [s for s in r.worst_layers(8) if s.sqnr_db != float("inf")]
    if worst:
        lt = Table(title="lowest output SQNR (layers that hurt)", title_justify="left")
        lt.add_column("module")
        lt.add_column("SQNR dB", justify="right")
        for s in worst:
            lt.add_row(s.name, f"{s.sqnr_db:.2f}")
        parts.append(lt)
    scored = getattr(p, "scored", "all")
    parts.append(
        f"[dim]protocol: {escape(p.dataset)} · window {p.window} · scored {scored} · "
        f"BOS {'yes' if p.add_bos else 'no'} · limit {p.limit_tokens or 'none'} · "
        f"transform {escape(p.transform or 'none')} · {escape(p.kl)}[/]"
    )
    store = getattr(p, "reference_store", "")
    if store:
        parts.append(f"[dim]reference: {escape(store)}[/]")
    return Group(*parts, *_compute_line(p))


def render_attention(r: Any) -> RenderableType:
    t = Table(title="attention deviation from fp64 standard attention", title_justify="left")
    for col in ("impl", "dtype", "seq", "block", "max |dev|", "mean |dev|"):
        t.add_column(col, justify="right")
    for row in r.rows:
        t.add_row(
            row.impl,
            row.dtype,
            str(row.seq_len),
            str(row.block_size or "-"),
            f"{row.max_abs_dev:.3e}",
            f"{row.mean_abs_dev:.3e}",
        )
    parts: list[RenderableType] = [t]
    ratios = r.ratios("bf16")
    if ratios:
        low = {x["seq_len"]: x for x in r.ratios("bf16", impl="flash-style-lowacc")}
        rt = Table(title="bf16: deviation / standard's deviation", title_justify="left")
        for col in ("seq", "block", "flash-style max", "mean", "lowacc max", "mean"):
            rt.add_column(col, justify="right")
        for x in ratios:
            lo = low.get(x["seq_len"], {})
            rt.add_row(
                str(x["seq_len"]),
                str(x["block_size"]),
                f"{x['max_ratio']:.2f}",
                f"{x['mean_ratio']:.2f}",
                f"{lo.get('max_ratio', float('nan')):.2f}",
                f"{lo.get('mean_ratio', float('nan')):.2f}",
            )
        parts.append(rt)
    p = r.protocol
    parts.append(
        f"[dim]protocol: {p.inputs}; batch {p.batch} × {p.heads} heads × dim {p.head_dim}, "
        f"causal, seed {p.seed}; not available here: {', '.join(p.unavailable) or 'none'}[/]"
    )
    return Group(*parts)


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool) or v is None


def render_fields(r: Any, title: str) -> RenderableType:
    """Any result with ``to_dict()``: its scalar fields as a table, its protocol as a line.

    The default renderer of a task that names none of its own; nested values other than the
    protocol are left to ``--json``."""
    d = r.to_dict() if hasattr(r, "to_dict") else dict(vars(r))
    t = Table(title=escape(title), title_justify="left")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in d.items():
        if k != "protocol" and _scalar(v):
            t.add_row(escape(str(k)), escape(f"{v:.6g}" if isinstance(v, float) else str(v)))
    protocol = d.get("protocol")
    if isinstance(protocol, dict) and protocol:
        shown = " · ".join(f"{k} {v}" for k, v in protocol.items() if _scalar(v))
        return Group(t, f"[dim]protocol: {escape(shown)}[/]")
    return t


__all__ = [
    "render_attention",
    "render_choice",
    "render_deviation",
    "render_fields",
    "render_perplexity",
]
