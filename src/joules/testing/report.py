"""A store of fake sweep results (no model runs), for the report's tests and screenshot.

    >>> from joules.testing.report import write_fake_store
    >>> path = write_fake_store(tmp_path / "fake.db")      # doctest: +SKIP

Every figure is synthetic (seeded), shaped like the real stages' results
(``BenchResult.to_dict()``, ``Prediction.to_dict()``, the compress manifest), and stored with
:func:`joules.sweep.results.extract_metrics`, so it carries the same methods a real sweep does.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from joules.sweep.results import extract_metrics
from joules.sweep.store import Store

# recipe, bits/weight of the linears, format, real kernel?, perplexity increase factor
FAKE_RECIPES = (
    ("baseline", 16.0, None, True, 1.0),
    ("rtn(format=int8-ch)", 8.25, "int8-ch", True, 1.004),
    ("rtn(format=int4-g64)", 4.5, "int4-g64", True, 1.09),
    ("gptq(format=int4-g64)", 4.5, "int4-g64", True, 1.05),
    ("awq(format=int4-g64) | gptq(format=int4-g64)", 4.5, "int4-g64", True, 1.04),
    ("rtn(format=mxfp4)", 4.25, "mxfp4", False, 1.12),
)
LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")]


def _timeline(rng: random.Random, seconds: float, watts: float) -> dict[str, Any]:
    n = 12
    t = [seconds * (i + 1) / n for i in range(n)]
    return {
        "t_s": t,
        "power_w": {
            "package0": [watts * (0.9 + 0.2 * rng.random()) for _ in t],
            "dram0": [0.15 * watts for _ in t],
        },
    }


def _phase(rng: random.Random, seconds: float, tokens: int, watts: float) -> dict[str, Any]:
    e = [seconds * watts * (0.97 + 0.06 * rng.random()) for _ in range(3)]
    med = sorted(e)[1]
    return {
        "energy_j": e, "tokens": tokens, "method": "estimated", "uncertainty_j": 0.1 * med,
        "duration_s": [seconds] * 3, "median_j": med, "j_per_token": med / tokens,
        "avg_power_w": watts, "timeline": _timeline(rng, seconds, watts),
    }  # fmt: skip


def write_fake_store(
    path: str | Path,
    seed: int = 0,
    failed: bool = True,
    model: str = "fake-135m",
    ppl_scale: float = 1.0,
) -> Path:
    """Write a store of fake finished runs (and one failed run if ``failed``) at ``path``;
    ``model`` names them (so several fake models can share a store), ``ppl_scale`` scales every
    perplexity of that model."""
    rng = random.Random(seed)
    base_ppl, base_bytes = ppl_scale * (18.0 + rng.random()), 270_000_000
    versions = {"joules": "0.0.0-fake", "torch": "2.13.0", "python": "3.11"}
    with Store(path) as store:
        for recipe, bits, fmt, real, factor in FAKE_RECIPES:
            key = "fake-" + hashlib.sha256(f"{model}/{recipe}/{seed}".encode()).hexdigest()[:16]
            store.begin_run(key, model, recipe, "p128/g32/b1/eager", {"recipe": recipe},
                            versions)  # fmt: skip
            nbytes = int(base_bytes * bits / 16)
            tpot = nbytes / 20e9 * (1.0 if real else 1.8)
            layers = {
                n: {"format": fmt, "method": recipe.split("(")[0], "bits_per_weight": bits,
                    "emulated": not real, "sqnr_db": 6.02 * bits - 4 + rng.random()}
                for n in LAYERS
            } if fmt else {}  # fmt: skip
            manifest = {"recipe": recipe, "bits_per_weight": bits, "model_bytes": nbytes,
                        "layers": layers,
                        "layer_paths": {n: "kernel:fake/bf16" if real else "emulated"
                                        for n in layers}}  # fmt: skip
            ppl = base_ppl * factor * (1 + 0.002 * rng.random())
            ev = {
                "wikitext2": {
                    "result": {"perplexity": ppl, "perplexity_ci95": [0.97 * ppl, 1.03 * ppl]}
                }
            }
            iv = lambda v: {"median": v, "ci95_low": 0.95 * v, "ci95_high": 1.05 * v,  # noqa: E731
                            "values": [v] * 3}  # fmt: skip
            bench = {
                "model": "fake-135m",
                "machine": {"cpu": "fake 2-vCPU", "flags": "avx2 fma"},
                "linear_paths": {"emulated": 0 if real else len(LAYERS)},
                "rows": [{
                    "prompt_len": 128, "batch": 1, "gen_len": 32, "ttft_s": iv(tpot * 16),
                    "tpot_s": iv(tpot), "decode_tok_s": 1 / tpot,
                    "peak_rss_bytes": nbytes + 50_000_000, "model_bytes": nbytes,
                    "prefill_energy": _phase(rng, tpot * 16, 128, 38.0),
                    "decode_energy": _phase(rng, tpot * 31, 31, 30.0),
                }],
            }  # fmt: skip
            preds = {
                hw: {"method": "predicted", "hardware": hw, "prefill_s": tpot * k * 12,
                     "tpot_s": tpot * k * (0.9 + 0.2 * rng.random()),
                     "decode_j_per_token": 30.0 * tpot * k * j, "band": {"decode": 0.15}}
                for hw, k, j in (("this-machine", 1.0, 1.0), ("h100", 0.01, 20.0))
            }  # fmt: skip
            store.finish_run(
                key, wall_s=1.0, timings={"bench": 1.0}, eval=ev, bench=bench,
                predictions=preds, manifest=manifest,
                metrics=extract_metrics(ev, bench, preds, manifest),
            )  # fmt: skip
        if failed:
            store.begin_run("fake-failed", model, "rtn(format=int2-g64)", None, {}, versions)
            store.fail_run("fake-failed", error="fake failure", traceback=None, wall_s=0.1,
                           timings={})  # fmt: skip
    return Path(path)
