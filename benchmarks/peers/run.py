"""Peers of joules' 4-bit table: quantize the baseline with each peer library and score it with
joules' own perplexity protocol. Runs in its own venv (``benchmarks/peers/.venv``), never the
project's: llm-compressor pins an older transformers, HQQ builds CUDA code unless told not to.

    python3.11 -m venv benchmarks/peers/.venv
    benchmarks/peers/.venv/bin/pip install torch==2.13.0  # the CPU wheel, as the Makefile does
    DISABLE_CUDA=1 benchmarks/peers/.venv/bin/pip install -r benchmarks/peers/requirements.txt
    benchmarks/peers/.venv/bin/pip install --no-deps -e .
    nice -n 19 env OMP_NUM_THREADS=1 DISABLE_CUDA=1 PYTHONPATH=src \\
        benchmarks/peers/.venv/bin/python benchmarks/peers/run.py --threads 1   # -> benchmarks/results/peers.json
    ... run.py --tokens 512 --out /tmp/peers-smoke.json                # a quick smoke test

Every peer starts from the same HF safetensors copy of the baseline (the fp32 conversion of the
default model's Q4_1 GGUF weights that ``load_model("smollm2-135m")`` caches), quantizes the
same linears as joules' recipes (every ``nn.Linear`` inside ``model.layers``; the tied
embedding/lm_head stays fp32), and is scored on the same WikiText-2 **test** tokens with the same
windows; llm-compressor's GPTQ calibrates on joules' own calibration set (WikiText-2 valid,
``calibration_tokens(tok, 128, 256, seed=0)``). Each row records the quantization time, the
process's peak RSS while quantizing, the bits per weight of what the peer stores for the
targeted linears, and the per-window NLLs (``benchmarks/compress4.py`` pairs them with joules'
baseline). Each peer runs in its own child process (its peak RSS is its own) and is written to
the JSON as soon as it finishes: a stopped run resumes with the peers it has not done.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from joules.serialize import atomic_write_json

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "peers.json"
PEER_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "torchao",
    "hqq",
    "optimum-quanto",
    "llmcompressor",
    "compressed-tensors",
    "safetensors",
    "numpy",
)

NOT_RUNNABLE = {
    "gptqmodel-w4-g64": "GPTQModel 7.7.0 requires torch>=2.14.1 and transformers>=5.20.2 (its "
    "requirements.txt): the project pins torch 2.13.0+cpu (PyPI's default linux torch wheel is "
    "the CUDA build) and llm-compressor 0.14 pins transformers<=5.17 in this venv",
}


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    }


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes the module holds in parameters, buffers and (HQQ) its ``meta`` dict, bias excluded."""
    seen: set[int] = set()
    total = 0
    extra = [
        v for v in (getattr(module, "meta", None) or {}).values() if isinstance(v, torch.Tensor)
    ]
    bias = getattr(module, "bias", None)
    for t in list(module.parameters()) + list(module.buffers()) + extra:
        if t is bias or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += _stored_bytes(t)
    return total


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclassed) tensor stores: the sum of its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Peers: each quantizes ``model`` in place (or returns a new one) and says what it stores
# --------------------------------------------------------------------------------------------


def torchao_int8(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(_targets(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return {
        "config": "quantize_(Int8WeightOnlyConfig()): int8 per output channel, symmetric",
        "stored": "held in memory: torchao's int8 weight + its per-channel scale",
    }


def hqq_4bit_g64(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for name, lin in _targets(model).items():
        q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
        # HQQ keeps scale/zero in its compute dtype: fp16 is its default (GPU) setting, which we
        # keep for storage; dequantization still runs in fp32 (fp16 meta promotes).
        for k in ("scale", "zero"):
            q.meta[k] = q.meta[k].to(torch.float16)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return {
        "config": f"HQQLinear(BaseQuantizeConfig(nbits=4, group_size=64)) = {cfg['weight_quant_params']}",
        "stored": "held in memory: 4-bit packed W_q (uint8) + per-group scale and zero, each "
        "kept in fp16 (HQQ's default meta dtype), compute in fp32",
    }


def quanto_qint4_g64(model: nn.Module, tok: Any, calib: torch.Tensor) -> dict[str, Any]:
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=["model.layers.*"])
    # quanto picks the group size itself (128): set 64 before freeze so it matches the others
    n = 0
    for m in model.modules():
        if getattr(m, "weight_qtype", None) == qint4:
            m.weight_group_size = 64
            n += 1
    freeze(model)
    return {
        "config": f"quantize(weights=qint4, include=model.layers.*), weight_group_size=64 on "
        f"{n} linears, freeze()",
        "stored": "held in memory after freeze(): quanto's packed 4-bit weight + per-group "
        "scale and shift",
        "scored_under": "torch.no_grad (quanto's QBitsTensor fails under inference_mode, which "
        "joules' scorer uses): the same arithmetic",
    }


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
    out = oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        tokenizer=tok,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    return {
        "model": out if isinstance(out, nn.Module) else model,
        "config": f"GPTQModifier({recipe.model_dump(exclude={'config_groups'})}) with "
        "config_groups W4A16 int4 symmetric group 64 (its W4A16 preset uses 128)",
        "stored": "what save_pretrained(save_compressed=True) writes for the targeted linears "
        "(packed int4 + per-group scale)",
        "needs_saved_bits": True,
    }


PEERS: dict[str, Callable[[nn.Module, Any, torch.Tensor], dict[str, Any]]] = {
    "torchao-int8-wo": torchao_int8,
    "hqq-4bit-g64": hqq_4bit_g64,
    "quanto-qint4-g64": quanto_qint4_g64,
    "llmcompressor-gptq-w4a16-g64": llmcompressor_gptq_w4a16_g64,
}


def _common() -> ModuleType:
    """``benchmarks/common.py``, loaded by path: this script runs as ``benchmarks/peers/run.py``,
    so the folder Python put on ``sys.path`` is ``peers/``, not the one ``common`` is in."""
    spec = importlib.util.spec_from_file_location("common", Path(__file__).parents[1] / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("joules", *PEER_PACKAGES):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def _saved_bits(model: nn.Module, targets: set[str]) -> tuple[int, dict[str, str]]:
    """Bytes of the targeted linears' tensors in the checkpoint ``save_pretrained`` writes."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, save_compressed=True)
        total, dtypes = 0, {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                    mod, _, leaf = key.rpartition(".")
                    if mod in targets and leaf != "bias":
                        t = sf.get_tensor(key)
                        total += t.numel() * t.element_size()
                        dtypes[leaf] = str(t.dtype).removeprefix("torch.")
    return total, dtypes


def _no_grad_scoring() -> None:
    """Score under torch.no_grad instead of inference_mode (same arithmetic)."""
    import importlib

    ppl = importlib.import_module("joules.evaluate.perplexity")  # the package re-exports a function
    base = ppl.Scorer

    class NoGradScorer(base):  # type: ignore[misc, valid-type]
        def token_nll(self, input_ids: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return base.token_nll.__wrapped__(self, input_ids, score)

    ppl.Scorer = NoGradScorer


def run_peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from joules.compress.api import PeakRSS
    from joules.compress.context import calibration_tokens
    from joules.evaluate.perplexity import wikitext2_perplexity

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.baseline)
    model = AutoModelForCausalLM.from_pretrained(args.baseline, dtype=torch.float32).eval()
    targets = _targets(model)
    numel = sum(m.weight.numel() for m in targets.values())
    calib, calib_info = calibration_tokens(tok, n=args.calib_n, length=args.calib_len, seed=0)
    entry: dict[str, Any] = {"peer": name}
    saved = False
    if name != "baseline":
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            notes = PEERS[name](model, tok, calib)
        entry["quantize_time_s"] = time.perf_counter() - t0
        entry["quantize_peak_rss_bytes"] = mem.peak_bytes
        model = notes.pop("model", model)
        saved = notes.pop("needs_saved_bits", False)
        entry.update(notes)
        if name.startswith("llmcompressor"):
            entry["calibration"] = calib_info
    if not saved:
        mods = dict(model.named_modules())
        stored = sum(_tensor_bytes(mods[n]) for n in targets)
    if "scored_under" in entry:
        _no_grad_scoring()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(calib[:1, :16])  # warm-up (optimum-quanto may compile its extension here)
    entry["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = wikitext2_perplexity(model, tok, limit_tokens=args.tokens, window=args.window)
    entry["eval_time_s"] = time.perf_counter() - t0
    entry["perplexity"] = r.to_dict()
    if saved:  # after scoring: save_pretrained compresses and decompresses the model in place
        stored, entry["saved_dtypes"] = _saved_bits(model, set(targets))
    entry["bits_per_weight_held"] = 8 * stored / numel
    entry["targeted_parameters"] = numel
    entry["targeted_linears"] = len(targets)
    return entry


def _default_baseline() -> str | None:
    """The cached safetensors conversion of the default model whose GGUF is still on disk."""
    dirs = sorted(glob.glob(os.path.expanduser("~/.cache/joules/models/SmolLM2-135M*")))
    for d in dirs:
        meta = Path(d) / "joules_gguf.json"
        if meta.is_file() and Path(json.loads(meta.read_text()).get("gguf_file", "")).is_file():
            return d
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _child(args: argparse.Namespace) -> int:
    """Run one peer in this process and write its row to ``args.row_out``."""
    try:
        row = run_peer(args.child, args)
    except Exception as exc:  # a peer failing is a result too: record why
        traceback.print_exc()
        row = {"peer": args.child, "error": f"{type(exc).__name__}: {exc}"[:800]}
    atomic_write_json(Path(args.row_out), row, indent=None)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=_default_baseline())
    ap.add_argument("--peers", default="baseline," + ",".join(PEERS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--force", action="store_true", help="redo peers already in the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    torch.set_num_threads(args.threads)
    base = Path(args.baseline)
    settings = {
        "tokens": args.tokens,
        "window": args.window,
        "calib_n": args.calib_n,
        "calib_len": args.calib_len,
        "threads": args.threads,
        "baseline_safetensors_sha256": _sha256(base / "model.safetensors"),
    }
    out = Path(args.out)
    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if data.get("settings") != settings:
        data = {}  # other tokens, windows or baseline: nothing to resume
    rows = data.setdefault("rows", {})
    header = _common().header("benchmarks/peers/run.py")
    header["versions"] = _versions()
    runs = data.setdefault("runs", [])
    runs.append(
        {
            "command": header["command"],
            "created_utc": header["created_utc"],
            "load_avg_1m_at_start": header["load_avg_1m_at_start"],
            "load_avg_at_start": list(os.getloadavg()),
        }
    )
    data.update(
        header,
        settings=settings,
        baseline_dir=str(base),
        shared_machine=(
            "the 2-vCPU machine was shared with other jobs (the lead's benchmarks, other "
            "engineers' tests); this ran niced at 1 thread, so times and RSS are indicative: "
            "see runs[].load_avg_at_start"
        ),
        not_runnable=NOT_RUNNABLE,
    )
    names = [p for p in args.peers.split(",") if p]
    data["planned"] = sorted(set(data.get("planned", [])) | set(names))
    for name in names:
        if name in rows and "error" not in rows[name] and not args.force:
            print(f"-- {name}: in {out.name} already", flush=True)
            continue
        print(f"-- {name}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--child", name, "--row-out", f.name]
            cmd += ["--baseline", str(base), "--tokens", str(args.tokens)]
            cmd += ["--window", str(args.window), "--calib-n", str(args.calib_n)]
            cmd += ["--calib-len", str(args.calib_len), "--threads", str(args.threads)]
            proc = subprocess.run(cmd)
            text = Path(f.name).read_text()
        row = (
            json.loads(text)
            if text
            else {"peer": name, "error": f"child process exited {proc.returncode}"}
        )
        row["run"] = len(runs) - 1
        rows[name] = row
        if "error" in row:
            print(f"   failed: {row['error']}", flush=True)
        else:
            p = row["perplexity"]
            print(
                f"   perplexity {p['perplexity']:.3f}, {row['bits_per_weight_held']:.3f} "
                f"bits/weight held, {row.get('quantize_time_s', 0):.1f} s",
                flush=True,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, data, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
