"""Perplexity through the KV cache, token by token: quantized (KIVI), sinks, window, heavy hitters.

    $ python benchmarks/kvcache.py                             # 2 streams x 512 tokens (smoke)
    $ python benchmarks/kvcache.py --streams 4 --length 1024   # what the README table ran
    $ python benchmarks/kvcache.py --streams 8 --length 2048   # the issue's setting (~30 min per
                                                               # configuration on one core here)
    $ python benchmarks/kvcache.py --streams 8 --length 2048 --bench  # + decode speed at 2,048 context
    $ python benchmarks/kvcache.py --markdown                  # the README table from the JSON

Every configuration decodes the same ``--streams`` non-overlapping WikiText-2 *test* streams of
``--length`` tokens one token at a time (batched across streams) through its cache, scoring each
next token, so eviction and quantization act exactly as in generation (not a masked full
forward). Baseline: transformers' ``DynamicCache`` with SDPA. Quantized caches are emulated
(fake-quant values in fp32; KV bytes are what packed storage of the format would take). Each
finished configuration is kept under ``$JOULES_CACHE_DIR/bench-kvcache`` (a stopped run resumes).
The default model's weights were Q4_1 before we saw them: every figure is relative to that model.
Writes ``benchmarks/results/kvcache.json`` and the per-position NLL plot ``docs/kvcache_nll.png``
(drawn by plotly, screenshotted by headless chromium when present).

``--bench``: decode tokens/s and peak RSS of each cache through ``joules.bench`` (eager runtime,
batch 1, a 2,048-token prompt, 32 generated tokens, 3 repeats) on the same process: a timed run,
so run it on a quiet machine.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from common import RowCache, figure_png, header, parser, write_json
from joules.compress.steps.kvcache import JoulesKVCache, KVSettings, kv_bytes_per_token
from joules.data import load_text
from joules.evaluate.perplexity import tokenize_stream
from joules.models import load_model
from joules.models.loading import model_identity

OUT = Path("benchmarks/results/kvcache.json")
PNG = Path("docs/kvcache_nll.png")  # the HTML (plotly inlined, ~5 MB) stays out of the repo


def configs(length: int) -> dict[str, KVSettings | None]:
    """The issue's comparisons: KIVI at 8/4/2 bits; sinks 4 + 256 vs a plain window of 260;
    heavy hitters at a 25 % budget vs sinks holding the same number of tokens."""
    keep = length // 4  # 25 % of the stream
    # in order of what the comparisons need first (each row is kept as it finishes)
    return {
        "dynamic (baseline)": None,
        "int4 kivi r128": KVSettings(format="int4", residual=128, group=32),
        "sinks 4 + window 256": KVSettings(policy="sinks", n_sinks=4, window=256),
        "window 260": KVSettings(policy="sinks", n_sinks=0, window=260),
        "int2 kivi r128": KVSettings(format="int2", residual=128, group=32),
        f"heavy hitters budget {keep}": KVSettings(policy="heavy_hitters", budget=keep),
        f"sinks 4 + window {keep - 4}": KVSettings(policy="sinks", n_sinks=4, window=keep - 4),
        "int8 kivi r128": KVSettings(format="int8", residual=128, group=32),
        # KIVI's value grouping: per token, in groups of 32 of the head's 64 channels
        "int4-g32 kivi r128": KVSettings(format="int4-g32", residual=128, group=32),
        # finer still: values in groups of 16 channels, keys per channel over 16-token halves
        "int4-g16 kivi r128": KVSettings(format="int4-g16", residual=128, group=32),
    }


def recipe_of(s: KVSettings) -> str:
    """The ``kvcache(...)`` recipe step of a configuration (for ``joules compress``)."""
    keys = ("format", "granularity", "residual", "group", "policy", "window", "n_sinks", "budget")
    default = KVSettings()
    args = [f"{k}={getattr(s, k)}" for k in keys if getattr(s, k) != getattr(default, k)]
    return f"kvcache({', '.join(args)})"


def stream_nll(model, ids: torch.Tensor, settings: KVSettings | None) -> tuple[list[float], float]:
    """Per-position mean NLL (over streams) of predicting token t+1 from tokens <= t."""
    from joules.compress.steps.kvcache import _rotator

    model.set_attn_implementation(
        "joules_h2o" if settings and settings.policy == "heavy_hitters" else "sdpa"
    )
    if settings is None:
        past = DynamicCache(config=model.config)
    else:
        past = JoulesKVCache(settings, model.config, _rotator(model))
    nll = []
    with torch.no_grad():
        for t in range(ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            nll.append(float(-logp.gather(1, ids[:, t + 1 : t + 2]).mean()))
    return nll, float(past.nbytes()) if settings is not None else float("nan")


def bench_cache(spec: str, s: KVSettings | None, prompt_len: int) -> dict:
    """Decode speed and peak RSS with this cache through ``joules.bench`` (eager runtime)."""
    from joules.bench.config import BenchConfig
    from joules.bench.runner import run_bench
    from joules.compress import compress

    model, tok, info = load_model(spec)
    if s is not None:
        compress(model, recipe_of(s))
        if s.policy == "heavy_hitters":
            model.set_attn_implementation("joules_h2o")
    res = run_bench(
        model, tok, info, BenchConfig(prompt_lens=(prompt_len,), gen_len=32, repeats=3)
    ).to_dict()
    r = res["rows"][0]
    return {
        "decode_tok_s": r["decode_tok_s"],
        "tpot_ms": 1e3 * r["tpot_s"]["median"],
        "ttft_s": r["ttft_s"]["median"],
        "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
        "bench_prompt_len": prompt_len,
    }


def plot(out: dict) -> None:
    """Per-position NLL (smoothed over 64 positions) of every cache, as the PNG the docs show."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in out["rows"]:
        y = r["nll_per_position"]
        k = 64
        smooth = [
            sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1])
            for i in range(len(y))
        ]
        fig.add_trace(go.Scatter(y=smooth, mode="lines", name=f"{r['cache']} (ppl {r['ppl']:.2f})"))
    fig.update_layout(
        title=f"NLL per position through the cache ({out['streams']} streams x {out['length']} "
        "WikiText-2 test tokens, mean over streams, 64-position moving average)",
        xaxis_title="position (token predicted)",
        yaxis_title="NLL (nats)",
        width=1100,
        height=600,
    )
    figure_png(fig, PNG, window=(1120, 620), check=False)  # no chromium: no picture


def markdown(out: dict) -> str:
    lines = [
        "| cache | recipe | ppl | vs dynamic | KV bytes/token (packed) | tokens held at the end "
        "| decode tok/s @2,048 | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        b = r.get("bench") or {}
        held = r.get("tokens_held_end")
        speed = f"{b['decode_tok_s']:.2f} | {b['peak_rss_mib']:.0f}" if b else "- | -"
        lines.append(
            f"| {r['cache']} | `{r['recipe'] or '-'}` | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f} % "
            f"| {r['kv_bytes_per_token_quantized']:,.0f} | {held if held is not None else '-'} "
            f"| {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, markdown=True)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated cache names (default: all)")
    ap.add_argument("--bench", action="store_true", help="also time decode at a long context")
    ap.add_argument("--bench-prompt", type=int, default=2048, help="prompt tokens of --bench")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return
    spec = "smollm2-135m"
    loaded = load_model(spec)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    ids = tokenize_stream(tok, load_text("wikitext2", "test"), limit_tokens=a.streams * a.length)
    x = torch.tensor(ids[: a.streams * a.length]).reshape(a.streams, a.length)
    only = {n.strip() for n in a.only.split(",") if n.strip()}
    # each finished configuration, keyed by the model's content, the streams and the code too
    kept = RowCache(
        "kvcache",
        {"model": model_identity(spec)["sha256"], "streams": a.streams, "length": a.length},
    )
    rows = []
    for name, s in configs(a.length).items():
        if only and name not in only:
            continue
        inputs = None if s is None else s.__dict__
        row = kept.get(name, inputs)
        if row is None:
            t0 = time.perf_counter()
            nll, nbytes = stream_nll(model, x, s)
            dt = time.perf_counter() - t0
            row = {
                "cache": name,
                "recipe": None if s is None else recipe_of(s),
                "settings": None if s is None else s.__dict__,
                "ppl": math.exp(sum(nll) / len(nll)),
                "kv_bytes_per_token_quantized": kv_bytes_per_token(s or KVSettings(), model.config),
                "kv_bytes_held_end_packed": nbytes,
                "tokens_held_end": None
                if s is None or s.policy == "full"
                else (s.budget if s.policy == "heavy_hitters" else s.n_sinks + s.window),
                "decode_s": dt,
                "threads": torch.get_num_threads(),
                "nll_per_position": nll,
            }
            kept.put(name, row, inputs)
        if a.bench and "bench" not in row:
            row["bench"] = bench_cache(spec, s, a.bench_prompt)
            kept.put(name, row, inputs)
        rows.append(row)
        print(
            f"{name:28s} ppl {row['ppl']:8.3f}  KV B/token {row['kv_bytes_per_token_quantized']:8.0f}"
            f"  {row['decode_s']:6.1f}s",
            flush=True,
        )
    if only and OUT.is_file():  # a partial run updates its rows and keeps the others
        new = {r["cache"]: r for r in rows}
        old = json.loads(OUT.read_text())["rows"]
        rows = [new.pop(r["cache"], r) for r in old] + list(new.values())
    base = next((r["ppl"] for r in rows if r["settings"] is None), rows[0]["ppl"])
    for r in rows:
        r["ppl_change_pct"] = 100 * (r["ppl"] / base - 1)
    out = {
        **header("benchmarks/kvcache.py"),
        "streams": a.streams,
        "length": a.length,
        "scored_tokens": a.streams * (a.length - 1),
        "note": "weights Q4_1 before we saw them; quantized KV emulated (fake-quant), bytes as "
        "packed storage would take",
        "rows": rows,
    }
    write_json(OUT, out, indent=1)
    plot(out)
    print(markdown(out))


if __name__ == "__main__":
    main()
