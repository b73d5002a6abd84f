"""Perplexity through the KV cache, token by token: quantized (KIVI), sinks, window, heavy hitters.

    $ python bench/kvcache.py                                  # 2 streams x 512 tokens
    $ python bench/kvcache.py --streams 8 --length 2048        # the issue's full setting (slow)

Every configuration decodes the same ``--streams`` non-overlapping WikiText-2 *test* streams of
``--length`` tokens one token at a time (batched across streams) through its cache, scoring each
next token, so eviction and quantization act exactly as in generation (not a masked full
forward). Baseline: transformers' ``DynamicCache`` with SDPA. Quantized caches are emulated
(fake-quant values in fp32; KV bytes are what packed storage of the format would take). The
default model's weights were Q4_1 before we saw them: every figure is relative to that model.
Writes ``bench/results/kvcache.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from joules.compress.kvcache import JoulesKVCache, KVSettings, kv_bytes_per_token
from joules.data import load_text
from joules.evaluate.perplexity import tokenize_stream
from joules.models import load_model
from joules.system import results_header


def configs(length: int) -> dict[str, KVSettings | None]:
    keep = length // 4  # 25 % of the stream
    return {
        "dynamic (baseline)": None,
        "int8 kivi r128": KVSettings(format="int8", residual=128, group=32),
        "int4 kivi r128": KVSettings(format="int4", residual=128, group=32),
        "int2 kivi r128": KVSettings(format="int2", residual=128, group=32),
        f"sinks 4 + window {keep - 4}": KVSettings(policy="sinks", n_sinks=4, window=keep - 4),
        f"window {keep}": KVSettings(policy="sinks", n_sinks=0, window=keep),
        f"heavy hitters budget {keep}": KVSettings(policy="heavy_hitters", budget=keep),
    }


def stream_nll(model, ids: torch.Tensor, settings: KVSettings | None) -> tuple[list[float], float]:
    """Per-position mean NLL (over streams) of predicting token t+1 from tokens <= t."""
    from joules.compress.kvcache import _rotator

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--out", default="bench/results/kvcache.json")
    a = ap.parse_args()
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    ids = tokenize_stream(tok, load_text("wikitext2", "test"), limit_tokens=a.streams * a.length)
    x = torch.tensor(ids[: a.streams * a.length]).reshape(a.streams, a.length)
    rows = []
    for name, s in configs(a.length).items():
        t0 = time.perf_counter()
        nll, nbytes = stream_nll(model, x, s)
        dt = time.perf_counter() - t0
        bpt = kv_bytes_per_token(s or KVSettings(), model.config)
        rows.append(
            {
                "cache": name,
                "settings": None if s is None else s.__dict__,
                "ppl": math.exp(sum(nll) / len(nll)),
                "kv_bytes_per_token_quantized": bpt,
                "kv_bytes_held_end_emulated_fp32": nbytes,
                "decode_s": dt,
                "nll_per_position": nll,
            }
        )
        print(f"{name:28s} ppl {rows[-1]['ppl']:8.3f}  KV B/token {bpt:8.0f}  {dt:6.1f}s")
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_change_pct"] = 100 * (r["ppl"] / base - 1)
    out = {
        **results_header("bench/kvcache.py"),
        "streams": a.streams,
        "length": a.length,
        "scored_tokens": a.streams * (a.length - 1),
        "note": "weights Q4_1 before we saw them; quantized KV emulated (fake-quant)",
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
