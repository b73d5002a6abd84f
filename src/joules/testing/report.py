"""A store of fake sweep results (no model runs), for the report's tests and screenshot.

    >>> from joules.testing.report import write_fake_deploy_store, write_fake_store
    >>> path = write_fake_store(tmp_path / "fake.db")      # doctest: +SKIP
    >>> path = write_fake_deploy_store(tmp_path / "deploy.db")  # doctest: +SKIP

Every figure is synthetic (seeded), shaped like the real stages' results
(``BenchResult.to_dict()``, ``Prediction.to_dict()``, the compress manifest), and stored with
:func:`joules.sweep.results.extract_metrics`, so it carries the same methods a real sweep does.
``write_fake_store`` is a torch-runtime sweep without KL divergence (what older stores hold);
``write_fake_deploy_store`` a deploy sweep: GGUF files benched through llama.cpp with their
``deploy`` manifest, llama.cpp peers (``llamacpp(ftype=..., imatrix=...)``), research rows on the
eager runtime, and the KLD figures (``kld_mean`` with its interval, ``kld_median``, ``kld_p99``,
``kld_max``, ``same_top_pct``, ``ppl_ratio``) added beside ``extract_metrics``' own.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from joules.models.info import SYNTHETIC_LABEL
from joules.sweep.results import extract_metrics
from joules.sweep.store import Metric, Store

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


def _phase(
    rng: random.Random, seconds: float, tokens: int, watts: float, spread: float = 0.06
) -> dict[str, Any]:
    e = [seconds * watts * (1 - spread / 2 + spread * rng.random()) for _ in range(3)]
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
    synthetic: bool = False,
) -> Path:
    """Write a store of fake finished runs (and one failed run if ``failed``) at ``path``;
    ``model`` names them (so several fake models can share a store), ``ppl_scale`` scales every
    perplexity of that model; ``synthetic``: the model's weights were random (its manifests
    carry :data:`~joules.models.info.SYNTHETIC_LABEL`)."""
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
            if synthetic:
                manifest["synthetic"] = SYNTHETIC_LABEL
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


# A deploy sweep of the default model, shaped like the real one (issue: deploy-first): every
# figure synthetic, near those measured by hand on smollm2-135m (llama.cpp Q4_0 with imatrix
# KLD 0.155, IQ4_NL with imatrix 0.084, joules' gptq Q4_0 export 0.083, Q4_K_M 0.031 at 105 MB).
# recipe, runtime, model bytes, mean KLD, p99 KLD, same top token %, decode tok/s, GGUF types
_MB = 1_000_000
FAKE_DEPLOY_RUNS = (
    ("baseline", "llamacpp", 538.1 * _MB, 0.0, 0.0, 100.0, 24.0, {"F32": 211}),
    ("rtn(format=gguf-q8_0)", "llamacpp", 143.9 * _MB, 0.0021, 0.021, 98.6, 68.0,
     {"Q8_0": 211}),
    ("rtn(format=gguf-q4_0)", "llamacpp", 91.7 * _MB, 0.262, 2.1, 80.1, 103.0,
     {"Q4_0": 181, "Q8_0": 30}),
    ("gptq(format=gguf-q4_0)", "llamacpp", 91.7 * _MB, 0.083, 0.58, 88.5, 101.0,
     {"Q4_0": 181, "Q8_0": 30}),
    ("awq(format=gguf-q4_0) | gptq(format=gguf-q4_0)", "llamacpp", 91.7 * _MB, 0.079, 0.55,
     88.9, 99.8, {"Q4_0": 181, "Q8_0": 30}),
    ("gptq(format=gguf-q4_k)", "llamacpp", 105.0 * _MB, 0.034, 0.31, 93.0, 91.0,
     {"Q4_K": 151, "Q6_K": 30, "Q5_0": 30}),
    ("llamacpp(ftype=Q8_0, imatrix=false)", "llamacpp", 143.9 * _MB, 0.0022, 0.022, 98.6, 69.0,
     {"Q8_0": 211}),
    ("llamacpp(ftype=Q4_K_M, imatrix=true)", "llamacpp", 105.2 * _MB, 0.031, 0.28, 93.4, 90.0,
     {"Q4_K": 151, "Q6_K": 30, "Q5_0": 30}),
    ("llamacpp(ftype=Q4_0, imatrix=false)", "llamacpp", 91.7 * _MB, 0.255, 2.0, 80.5, 104.0,
     {"Q4_0": 181, "Q8_0": 30}),
    ("llamacpp(ftype=Q4_0, imatrix=true)", "llamacpp", 91.7 * _MB, 0.155, 1.1, 84.9, 103.5,
     {"Q4_0": 181, "Q8_0": 30}),
    ("llamacpp(ftype=IQ4_NL, imatrix=true)", "llamacpp", 91.7 * _MB, 0.084, 0.48, 88.4, 88.0,
     {"IQ4_NL": 181, "Q8_0": 30}),
    ("baseline", "eager", 538.1 * _MB, 0.0, 0.0, 100.0, 11.0, {}),
    ("gptq(format=int4-g64)", "eager", 82.0 * _MB, 0.088, 0.61, 88.2, 22.0, {}),
    ("awq(format=int4-g64) | gptq(format=int4-g64)", "eager", 82.0 * _MB, 0.081, 0.57, 88.7,
     21.0, {}),
)  # fmt: skip
DEFAULT_PARAMS = 134_515_008  # smollm2-135m's parameter count
DEPLOY_LAYERS = [
    f"model.layers.{i}.{p}"
    for i in range(30)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]  # fmt: skip


def _kld_metrics(rng: random.Random, kld: float, p99: float, same_top: float, ratio: float,
                 ratio_half: float) -> list[Metric]:  # fmt: skip
    """The figures the deviation task stores per candidate (KLD statistics, perplexity ratio)."""
    half = 0.04 * kld * (1 + 0.2 * rng.random())
    return [
        Metric("kld_mean", kld, "nat", "measured", kld - half, kld + half),
        Metric("kld_median", 0.45 * kld, "nat", "measured"),
        Metric("kld_p99", p99, "nat", "measured"),
        Metric("kld_max", 4.0 * p99 + 0.5 * kld, "nat", "measured"),
        Metric("same_top_pct", same_top, "%", "measured"),
        Metric("ppl_ratio", ratio, "", "measured", ratio - ratio_half, ratio + ratio_half),
    ]


def write_fake_deploy_store(
    path: str | Path, seed: int = 0, failed: bool = True, model: str = "smollm2-135m"
) -> Path:
    """Write a store shaped like ``joules sweep examples/deploy.toml``: the baseline and joules'
    GGUF exports benched through llama.cpp (deployable rows, each manifest with its ``deploy``
    GGUF), llama.cpp's own quantizer as peers (``llamacpp(ftype=..., imatrix=...)``), and
    research rows on the eager torch runtime; KLD statistics and the perplexity ratio beside the
    paired perplexity increase. Every figure is synthetic (``FAKE_DEPLOY_RUNS``)."""
    rng = random.Random(seed)
    base_ppl = 15.8 + 0.2 * rng.random()
    versions = {"joules": "0.0.0-fake", "torch": "2.13.0", "llama_cpp": "0.3.16",
                "python": "3.11"}  # fmt: skip
    with Store(path) as store:
        for recipe, runtime, nbytes, kld, p99, same_top, tok_s, types in FAKE_DEPLOY_RUNS:
            workload = f"p64/g32/b1/{runtime}"
            key = (
                "fake-"
                + hashlib.sha256(f"{model}/{recipe}/{workload}/{seed}".encode()).hexdigest()[:16]
            )
            store.begin_run(key, model, recipe, workload, {"recipe": recipe, "runtime": runtime},
                            versions)  # fmt: skip
            nbytes = int(nbytes)
            bits = 8 * nbytes / DEFAULT_PARAMS
            tok_s *= 1 + 0.002 * (rng.random() - 0.5)
            tpot = 1 / tok_s
            fmt = None if recipe == "baseline" or recipe.startswith("llamacpp(") else (
                recipe.rsplit("format=", 1)[-1].rstrip(")"))  # fmt: skip
            layers = {
                n: {"format": fmt, "method": recipe.split("(")[0].split("|")[-1].strip(),
                    "bits_per_weight": 4.5 if "q4" in fmt or "int4" in fmt else 8.5,
                    "emulated": False,
                    "sqnr_db": (16.0 if "q4" in fmt or "int4" in fmt else 40.0)
                    + (1.5 if recipe.startswith(("gptq", "awq")) else 0.0)
                    + 2.0 * rng.random() - (3.0 if "down_proj" in n and i < 3 else 0.0)}
                for i, n in ((int(n.split(".")[2]), n) for n in DEPLOY_LAYERS)
            } if fmt else {}  # fmt: skip
            kernel = "llama.cpp" if runtime == "llamacpp" else "kernel:cpu-int4/bf16"
            manifest: dict[str, Any] = {"recipe": recipe, "bits_per_weight": bits,
                                        "model_bytes": nbytes, "layers": layers,
                                        "linear_paths": {kernel: len(layers)} if layers else {}}  # fmt: skip
            if runtime == "llamacpp":
                name = recipe.replace("llamacpp(", "llamacpp-").replace("format=", "")
                name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
                manifest["deploy"] = {"runtime": "llamacpp", "gguf": {
                    "path": f"~/.cache/joules/gguf/{model}.{name}.gguf", "size_bytes": nbytes,
                    "sha256": hashlib.sha256(key.encode()).hexdigest(), "types": types}}  # fmt: skip
            ratio = 1 + 0.95 * kld + 0.001 * rng.random() if kld else 1.0
            half = 0.006 * min(1.0, 10 * kld)
            ppl = base_ppl * ratio
            pct = 100 * (ratio - 1)
            ev = {
                "wikitext2": {
                    "result": {"perplexity": ppl, "perplexity_ci95": [0.97 * ppl, 1.03 * ppl]},
                    "paired": {"pct": pct, "lo": pct - 100 * half, "hi": pct + 100 * half},
                }
            }
            iv = lambda v: {"median": v, "ci95_low": 0.97 * v, "ci95_high": 1.03 * v,  # noqa: E731
                            "values": [v] * 5}  # fmt: skip
            watts = 28.0 * (1 + 0.004 * (rng.random() - 0.5))
            bench = {
                "model": model,
                "machine": {"cpu": "fake 2-vCPU (illustrative)", "flags": "avx2 fma"},
                "rows": [{
                    "prompt_len": 64, "batch": 1, "gen_len": 32, "ttft_s": iv(tpot * 6),
                    "tpot_s": iv(tpot), "decode_tok_s": tok_s,
                    "peak_rss_bytes": nbytes + 60_000_000, "model_bytes": nbytes,
                    "prefill_energy": _phase(rng, tpot * 6, 64, watts + 6.0, 0.01),
                    "decode_energy": _phase(rng, tpot * 31, 31, watts, 0.01),
                }],
            }  # fmt: skip
            preds = {"this-machine": {
                "method": "predicted", "hardware": "this-machine", "prefill_s": tpot * 6,
                "tpot_s": tpot * (0.85 + 0.3 * rng.random()),
                "decode_j_per_token": watts * tpot * (0.8 + 0.4 * rng.random()),
                "band": {"decode": 0.2}}}  # fmt: skip
            extra = _kld_metrics(rng, kld, p99, same_top, ratio, half)
            # the deviation task's result, as the sweep stores it (keys of llama-perplexity's
            # --kl-divergence figures); the Metric rows above are added whether or not this
            # joules' extract_metrics reads them from it
            fig = {m.name: m for m in extra}
            ev["deviation"] = {"result": {
                "kl_mean": kld, "kl_lo": fig["kld_mean"].lo, "kl_hi": fig["kld_mean"].hi,
                "kl_median": fig["kld_median"].value, "kl_p99": p99,
                "kl_max": fig["kld_max"].value, "top1_agreement": same_top / 100,
                "ppl_ratio": ratio, "ppl_ratio_lo": ratio - half, "ppl_ratio_hi": ratio + half,
            }}  # fmt: skip
            metrics = extract_metrics(ev, bench, preds, manifest)
            names = set(fig)
            store.finish_run(
                key, wall_s=1.0, timings={"bench": 1.0}, eval=ev, bench=bench,
                predictions=preds, manifest=manifest,
                metrics=[m for m in metrics if m.name not in names] + extra,
            )  # fmt: skip
        if failed:
            store.begin_run("fake-failed-q2k", model, "llamacpp(ftype=Q2_K, imatrix=true)",
                            "p64/g32/b1/llamacpp", {}, versions)  # fmt: skip
            store.fail_run("fake-failed-q2k", error="fake failure: llama-quantize exited 1",
                           traceback=None, wall_s=0.1, timings={})  # fmt: skip
    return Path(path)
