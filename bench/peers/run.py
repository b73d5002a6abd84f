"""Peers of joules' 4-bit table: quantize the baseline with each peer library and score it with
joules' own perplexity protocol. Runs in its own venv (``bench/peers/.venv``), never the
project's: llm-compressor pins an older transformers, HQQ builds CUDA code unless told not to.

    python3.11 -m venv bench/peers/.venv
    DISABLE_CUDA=1 bench/peers/.venv/bin/pip install -r bench/peers/requirements.txt
    bench/peers/.venv/bin/pip install --no-deps -e .
    flock /tmp/joules-heavy.lock env DISABLE_CUDA=1 PYTHONPATH=src \\
        bench/peers/.venv/bin/python bench/peers/run.py            # -> bench/results/peers.json

Every peer starts from the same HF safetensors copy of the baseline (the fp32 conversion of the
default model's Q4_1 GGUF weights that ``load_model("smollm2-135m")`` caches), quantizes the
same linears as joules' recipes (every ``nn.Linear`` inside ``model.layers``; the tied
embedding/lm_head stays fp32), and is scored on the same WikiText-2 **test** tokens with the same
windows; llm-compressor's GPTQ calibrates on joules' own calibration set (WikiText-2 valid,
``calibration_tokens(tok, 128, 256, seed=0)``). Each row records the quantization time, the
process's peak RSS while quantizing, the bits per weight of what the peer stores for the
targeted linears, and the per-window NLLs (``bench/compress.py`` pairs them with its baseline).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "peers.json"

NOT_RUNNABLE = {
    "gptqmodel-w4-g64": "GPTQModel 7.7 needs torch >= 2.14.1 (a CUDA build here); torch is "
    "2.13.0+cpu on this machine",
}


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    }


def _tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    extra = [
        v for v in (getattr(module, "meta", None) or {}).values() if isinstance(v, torch.Tensor)
    ]
    for t in list(module.parameters()) + list(module.buffers()) + extra:  # HQQ: scale/zero in meta
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += _stored_bytes(t)
    return total


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclassed) tensor stores: the sum of its inner tensors."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None:
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Peers: each quantizes ``model`` in place and returns notes
# --------------------------------------------------------------------------------------------


def torchao_int8(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(_targets(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return {"config": "Int8WeightOnlyConfig() (per-channel symmetric int8)"}


def hqq_4bit_g64(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for name, lin in _targets(model).items():
        q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return {"config": f"BaseQuantizeConfig(nbits=4, group_size=64) = {cfg}"}


def quanto_qint4_g64(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=["model.layers.*"])
    # quanto picks the group size itself (128, or 96 for 576-wide rows): set 64 before freeze
    n = 0
    for m in model.modules():
        if getattr(m, "weight_qtype", None) == qint4:
            m.weight_group_size = 64
            n += 1
    freeze(model)
    return {"config": f"quantize(weights=qint4) on model.layers.*, group size 64 on {n} linears"}


def llmcompressor_gptq_w4a16_g64(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=64
        ),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        tokenizer=tok,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
    )
    return {"config": "GPTQModifier W4A16, int4 symmetric, group 64 (custom config_groups)"}


PEERS: dict[str, Callable[[nn.Module, Any, torch.Tensor], dict[str, Any]]] = {
    "torchao-int8-wo": torchao_int8,
    "hqq-4bit-g64": hqq_4bit_g64,
    "quanto-qint4-g64": quanto_qint4_g64,
    "llmcompressor-gptq-w4a16-g64": llmcompressor_gptq_w4a16_g64,
}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", "torchao", "hqq", "optimum-quanto", "llmcompressor"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def run_peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from joules.compress.api import PeakRSS
    from joules.compress.context import calibration_tokens
    from joules.evaluate.perplexity import wikitext2_perplexity

    tok = AutoTokenizer.from_pretrained(args.baseline)
    model = AutoModelForCausalLM.from_pretrained(args.baseline, dtype=torch.float32).eval()
    targets = _targets(model)
    numel = sum(m.weight.numel() for m in targets.values())
    calib, calib_info = calibration_tokens(tok, n=args.calib_n, length=args.calib_len, seed=0)
    entry: dict[str, Any] = {"peer": name}
    if name != "baseline":
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            entry.update(PEERS[name](model, tok, calib))
        entry["quantize_time_s"] = time.perf_counter() - t0
        entry["quantize_peak_rss_bytes"] = mem.peak_bytes
        if name.startswith("llmcompressor"):
            entry["calibration"] = calib_info
    mods = dict(model.named_modules())
    stored = sum(_tensor_bytes(mods[n]) - _bias_bytes(mods[n]) for n in targets)
    entry["bits_per_weight_held"] = 8 * stored / numel
    entry["targeted_parameters"] = numel
    with torch.no_grad():
        model(calib[:1, :16])  # warm-up (optimum-quanto compiles its extension here)
    t0 = time.perf_counter()
    r = wikitext2_perplexity(model, tok, limit_tokens=args.tokens, window=args.window)
    entry["eval_time_s"] = time.perf_counter() - t0
    entry["perplexity"] = r.to_dict()
    return entry


def _bias_bytes(m: nn.Module) -> int:
    b = getattr(m, "bias", None)
    return b.numel() * b.element_size() if isinstance(b, torch.Tensor) else 0


def main() -> int:
    default_base = sorted(glob.glob(os.path.expanduser("~/.cache/joules/models/SmolLM2-135M*")))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=default_base[-1] if default_base else None)
    ap.add_argument("--peers", default="baseline," + ",".join(PEERS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    data.update(
        command="python bench/peers/run.py " + " ".join(sys.argv[1:]),
        versions=_versions(),
        platform=platform.platform(),
        settings={
            "tokens": args.tokens,
            "window": args.window,
            "calib_n": args.calib_n,
            "calib_len": args.calib_len,
            "threads": args.threads,
        },
        not_runnable=NOT_RUNNABLE,
    )
    rows = data.setdefault("rows", {})
    for name in [p for p in args.peers.split(",") if p]:
        print(f"-- {name}", flush=True)
        try:
            rows[name] = run_peer(name, args)
            p = rows[name]["perplexity"]
            print(
                f"   perplexity {p['perplexity']:.3f}, {rows[name]['bits_per_weight_held']:.3f} "
                f"bits/weight held, {rows[name].get('quantize_time_s', 0):.1f} s",
                flush=True,
            )
        except Exception as exc:  # a peer failing is a result too: record why
            rows[name] = {"peer": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
