"""joules' importance matrix and no-build peer against the source-built llama.cpp tools.

    benchmarks/peers/llamacpp/build.sh                       # once: build/bin/llama-{imatrix,quantize,perplexity}
    nice .venv/bin/python benchmarks/peers/llamacpp/check.py # -> benchmarks/peers/llamacpp/check.json

On the default model (``smollm2-135m``; its weights were Q4_1 before joules saw them) exported
as F32 GGUF (:func:`joules.deploy.peer.base_f32_gguf`), with ``--chunks`` chunks of ``--ctx``
tokens of WikiText-2 **valid** as llama-imatrix reads them (the text file tokenized by llama.cpp,
consecutive chunks, BOS in place of each chunk's first token only where the vocabulary adds BOS):

(a) ``llama-imatrix`` vs :func:`joules.deploy.imatrix.compute_imatrix` (torch fp32) on the same
    chunks: names, counts, and the relative difference of the values llama-quantize uses
    (sums / count) per tensor; and whether :func:`save_imatrix` rewrites llama-imatrix's own file
    byte for byte from what :func:`load_imatrix` read.
(b) per preset: ``llama-quantize --imatrix LLAMA_FILE`` vs :func:`llamacpp_peer` with
    ``load_imatrix(LLAMA_FILE)``: sha256 of both files.
(c) the same with joules' imatrix file (what llama-quantize reads from :func:`save_imatrix`),
    and the peer from joules' imatrix vs the peer from llama-imatrix's, block by block.

Files go to ``--work`` (default ``build/check`` beside the tools, git-ignored).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from joules.serialize import atomic_write_text

HERE = Path(__file__).resolve().parent
BIN = HERE / "build" / "bin"
PRESETS = ("Q4_0", "Q4_K_M", "IQ4_NL")


def _common() -> ModuleType:
    """``benchmarks/common.py``, loaded by path (this script's folder is not ``benchmarks/``)."""
    spec = importlib.util.spec_from_file_location("common", HERE.parents[1] / "common.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-600:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {tail}")
    return time.perf_counter() - t0


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def compare_imatrix(ours: Any, ref: Any) -> dict[str, Any]:
    names = ref.names()
    rel = {n: _rel(ours.values(n), ref.values(n)) for n in names if n in ours.sums}
    col = {
        n: float(np.max(np.abs(ours.values(n) / ref.values(n) - 1)))
        for n in names
        if n in ours.sums
    }
    worst = sorted(rel, key=rel.get, reverse=True)[:5]
    return {
        "same_names": ours.names() == names,
        "only_llama": sorted(set(names) - set(ours.sums)),
        "only_joules": sorted(set(ours.sums) - set(names)),
        "same_counts": all(
            np.array_equal(ours.counts[n], ref.counts[n]) for n in names if n in ours.counts
        ),
        "counts": sorted({int(ref.counts[n][0]) for n in names}),
        "rel_l2_median": statistics.median(rel.values()),
        "rel_l2_max": max(rel.values()),
        "max_column_rel_median": statistics.median(col.values()),
        "max_column_rel_max": max(col.values()),
        "worst_tensors": {n: rel[n] for n in worst},
        "rel_l2_by_kind": {
            kind: max(v for n, v in rel.items() if n.split(".")[2] == kind)
            for kind in sorted({n.split(".")[2] for n in rel})
        },
    }


def block_diff(a_path: Path, b_path: Path, names: list[str]) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two GGUF files of the same types: differing blocks of the
    tensors ``names`` (those with an importance matrix entry); every other tensor must match."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    a = {t.name: t for t in GGUFReader(str(a_path)).tensors}
    b = {t.name: t for t in GGUFReader(str(b_path)).tensors}
    assert a.keys() == b.keys()
    others_equal = all(
        np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a if n not in names
    )
    total = diff = 0
    by_type: dict[str, list[int]] = {}
    tensors_differing = 0
    for name in names:
        ta, tb = a[name], b[name]
        if ta.tensor_type != tb.tensor_type:
            raise RuntimeError(f"{name}: {ta.tensor_type.name} vs {tb.tensor_type.name}")
        _, type_size = GGML_QUANT_SIZES[ta.tensor_type]
        xa = np.asarray(ta.data).view(np.uint8).reshape(-1, type_size)
        xb = np.asarray(tb.data).view(np.uint8).reshape(-1, type_size)
        d = int((xa != xb).any(axis=1).sum())
        total += xa.shape[0]
        diff += d
        tensors_differing += d > 0
        slot = by_type.setdefault(ta.tensor_type.name, [0, 0])
        slot[0] += d
        slot[1] += xa.shape[0]
    return {
        "tensors": len(names),
        "blocks": total,
        "blocks_differing": diff,
        "fraction": diff / total,
        "tensors_differing": tensors_differing,
        "by_type": {t: {"differing": d, "blocks": n} for t, (d, n) in sorted(by_type.items())},
        "tensors_without_imatrix_identical": others_equal,
    }


def noise_control(
    f32: Path, peer: Path, ref: Any, rel: dict[str, float], seed: int = 0
) -> dict[str, Any]:
    """How many blocks flip when llama-imatrix's own values are perturbed by relative noise of
    the size joules' values differ from them (per tensor, Gaussian, seeded): quantize each
    tensor's F32 rows with the type llama.cpp chose, with the values and with the perturbed
    values (ggml_quantize_chunk through joules.deploy.llamacpp.ggml_quantize)."""
    from gguf import GGUFReader

    from joules.deploy.llamacpp import ggml_quantize

    rng = np.random.default_rng(seed)
    src = {t.name: t for t in GGUFReader(str(f32)).tensors}
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(peer)).tensors}
    total = diff = 0
    for name, eps in sorted(rel.items()):
        t = src[name]
        x = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        v = ref.values(name)
        noisy = (v * (1 + eps * rng.standard_normal(v.shape))).astype(np.float32)
        qa = ggml_quantize(x, types[name], v)
        qb = ggml_quantize(x, types[name], np.maximum(noisy, 0))
        row_blocks = qa.reshape(qa.shape[0], -1, _type_size(types[name]))
        d = (row_blocks != qb.reshape(row_blocks.shape)).any(axis=2)
        total += d.size
        diff += int(d.sum())
    return {"blocks": total, "blocks_differing": diff, "fraction": diff / total, "seed": seed}


def _type_size(ggml_type: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][1]


def main() -> None:
    common = _common()
    ap = common.parser(__doc__, out=HERE / "check.json", model="smollm2-135m", threads=2)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=HERE / "build" / "check")
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    head = common.header("benchmarks/peers/llamacpp/check.py")

    import llama_cpp
    import torch
    from gguf import GGUFReader

    from joules.data import load_text
    from joules.data.tokens import tokenize_stream
    from joules.deploy.imatrix import (
        compute_imatrix,
        imatrix_gguf_bytes,
        load_imatrix,
        save_imatrix,
    )
    from joules.deploy.peer import base_f32_gguf, llamacpp_peer
    from joules.fingerprint import file_sha256
    from joules.models import load_model

    for tool in ("llama-imatrix", "llama-quantize"):
        if not (BIN / tool).is_file():
            raise SystemExit(f"{BIN / tool} missing: run benchmarks/peers/llamacpp/build.sh first")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    f32 = base_f32_gguf(args.model)

    # -- the calibration text as llama-imatrix reads it (-f drops one trailing newline) ----------
    text = load_text("wikitext2", "valid")
    text_file = work / "wikitext2-valid.txt"
    atomic_write_text(text_file, text)
    seen = text[:-1] if text.endswith("\n") else text
    vocab = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    ids = vocab.tokenize(seen.encode("utf-8"), add_bos=True, special=False)
    fields = GGUFReader(str(f32)).fields
    add_bos = (
        bool(fields["tokenizer.ggml.add_bos_token"].contents())
        if ("tokenizer.ggml.add_bos_token" in fields)
        else False
    )
    n = args.chunks * args.ctx
    chunks = torch.tensor(ids[:n], dtype=torch.long).reshape(args.chunks, args.ctx)
    if add_bos:
        chunks[:, 0] = vocab.token_bos()
    lm = load_model(args.model)
    hf_ids = tokenize_stream(lm.tokenizer, text, limit_tokens=n)
    tok_agree = int(sum(a != b for a, b in zip(hf_ids, ids[:n], strict=True)))

    # -- (a) the importance matrices -------------------------------------------------------------
    llama_im_path = work / "llama-imatrix.gguf"
    cmd = [
        str(BIN / "llama-imatrix"), "-m", str(f32), "-f", str(text_file), "-o", str(llama_im_path),
        "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads), "--no-ppl",
        "-nr",
    ]  # fmt: skip
    llama_imatrix_s = _run(cmd, work / "llama-imatrix.log")
    ref = load_imatrix(llama_im_path)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    ours = compute_imatrix(lm.model, chunks, dataset="wikitext2-valid")
    joules_imatrix_s = time.perf_counter() - t0
    joules_im_path = save_imatrix(work / "joules-imatrix.gguf", ours)
    a = compare_imatrix(ours, ref)
    rel = {n: _rel(ours.values(n), ref.values(n)) for n in ref.names()}
    a["save_rewrites_llama_file_bytes"] = imatrix_gguf_bytes(ref) == llama_im_path.read_bytes()
    a["llama_imatrix_s"] = llama_imatrix_s
    a["joules_imatrix_s"] = joules_imatrix_s
    a["llama_metadata"] = {
        "datasets": ref.datasets,
        "chunk_count": ref.chunk_count,
        "chunk_size": ref.chunk_size,
    }

    # -- (b), (c) the quantized files --------------------------------------------------------------
    rows = []
    for preset in args.presets.split(","):
        row: dict[str, Any] = {"preset": preset}
        for label, im_path in (
            ("llama_imatrix", llama_im_path),
            ("joules_imatrix", joules_im_path),
        ):
            tool_out = work / f"tool-{preset}-{label}.gguf"
            cmd = [
                str(BIN / "llama-quantize"), "--imatrix", str(im_path), str(f32), str(tool_out),
                preset, str(args.threads),
            ]  # fmt: skip
            tool_s = _run(cmd, work / f"tool-{preset}-{label}.log")
            peer = llamacpp_peer(
                f32, preset, work / f"peer-{preset}-{label}.gguf",
                imatrix=load_imatrix(str(im_path)), threads=args.threads,
            )  # fmt: skip
            _, tool_sha = file_sha256(tool_out)
            row[label] = {
                "tool_sha256": tool_sha,
                "peer_sha256": peer.sha256,
                "identical": tool_sha == peer.sha256,
                "size_bytes": peer.size_bytes,
                "types": peer.type_counts(),
                "llama_quantize_s": tool_s,
            }
        llama_peer = work / f"peer-{preset}-llama_imatrix.gguf"
        row["joules_vs_llama_imatrix_peer"] = block_diff(
            work / f"peer-{preset}-joules_imatrix.gguf", llama_peer, ref.names()
        )
        row["noise_control"] = noise_control(f32, llama_peer, ref, rel)
        rows.append(row)
        print(
            preset,
            {k: v["identical"] for k, v in row.items() if isinstance(v, dict) and "identical" in v},
            row["joules_vs_llama_imatrix_peer"]["fraction"],
        )

    out = {
        **head,
        "settings": {
            "model": args.model,
            "chunks": args.chunks,
            "ctx": args.ctx,
            "threads": args.threads,
            "text": "wikitext2 valid (joules.data), whole split as the -f file",
            "f32_gguf_sha256": file_sha256(f32)[1],
            "add_bos": add_bos,
            "tokens_hf_vs_llamacpp_differing": tok_agree,
            "note": "the default model's weights were Q4_1 before joules saw them",
        },
        "imatrix": a,
        "presets": rows,
    }
    common.write_json(args.out, out)
    print(
        f"imatrix rel L2 median {a['rel_l2_median']:.2e} max {a['rel_l2_max']:.2e}; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
