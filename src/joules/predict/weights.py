"""Bytes of every weight of a model in a given format, or as a compressed model's manifest says.

    >>> from joules.predict.shape import ModelShape
    >>> from joules.predict.weights import weight_plan
    >>> s = ModelShape("t", "llama", 2, 64, 4, 2, 16, 128, 384)
    >>> dense, int4 = weight_plan(s, "fp32", "fp32"), weight_plan(s, "int4-g32", "fp32")
    >>> dense.layers[0]["qkv_proj"].nbytes, int4.layers[0]["qkv_proj"].nbytes   # 128 x 64
    (32768.0, 4608.0)

Bits per weight come from ``joules.formats.get(spec).bits_per_element(shape)`` (scales,
zero-points and codebooks included); ``fp32``, ``bf16`` and ``fp16`` are dense. The format
applies to the decoder linears (what ``joules compress`` targets by default); the embedding and
an untied ``lm_head`` stay in ``head_format`` (the compute dtype unless given).

A manifest (``joules.json`` of a compressed directory) overrides per layer: ``layers[name]``
with ``nbytes`` (preferred) or ``bits_per_weight``, ``format``, ``path`` (``kernel:<name>``
or ``emulated``: an emulated layer dequantizes to a dense copy every forward, so its weight is
written and read again at the compute dtype) and ``sparsity`` (recorded; FLOPs stay dense, no
sparse kernel is assumed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from joules.errors import ConfigError
from joules.predict.shape import ModelShape

DENSE_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0}
# Linear name inside a decoder layer -> the roofline operator it belongs to.
OP_OF_LINEAR = {
    "self_attn.q_proj": "qkv_proj",
    "self_attn.k_proj": "qkv_proj",
    "self_attn.v_proj": "qkv_proj",
    "self_attn.o_proj": "o_proj",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
    "mlp.down_proj": "mlp",
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass
class OpWeights:
    """Weights of one operator of one layer: stored bytes, elements, and how they are read."""

    nbytes: float = 0.0
    elements: int = 0
    dequant_elements: int = 0  # elements a kernel must dequantize each forward
    emulated_elements: int = 0  # elements written and re-read as a dense copy each forward
    formats: tuple[str, ...] = ()

    def add(self, nbytes: float, elements: int, fmt: str, dense: bool, emulated: bool) -> None:
        self.nbytes += nbytes
        self.elements += elements
        if not dense:
            self.dequant_elements += elements
        if emulated:
            self.emulated_elements += elements
        if fmt not in self.formats:
            self.formats = (*self.formats, fmt)


@dataclass
class WeightPlan:
    """Per-layer operator weights plus embedding and head."""

    layers: list[dict[str, OpWeights]]
    embedding: OpWeights
    lm_head: OpWeights  # tied: same storage as the embedding (read again at decode)
    tied: bool

    @property
    def total_bytes(self) -> float:
        """Bytes stored (a tied head is stored once)."""
        n = sum(w.nbytes for layer in self.layers for w in layer.values())
        return n + self.embedding.nbytes + (0.0 if self.tied else self.lm_head.nbytes)

    def bits_per_weight(self) -> float:
        """Mean stored bits per decoder-linear weight."""
        el = sum(w.elements for layer in self.layers for k, w in layer.items() if k != "norms")
        nb = sum(w.nbytes for layer in self.layers for k, w in layer.items() if k != "norms")
        return 8.0 * nb / el if el else float("nan")


def format_bits(spec: str, shape: tuple[int, int]) -> tuple[float, bool]:
    """(bits per element, is_dense) of a weight format spec for one (out, in) weight."""
    low = spec.lower()
    if low in DENSE_BITS:
        return DENSE_BITS[low], True
    from joules import formats

    return float(formats.get(spec).bits_per_element(shape)), False


def weight_plan(
    shape: ModelShape,
    weight_format: str,
    compute_dtype: str,
    *,
    head_format: str | None = None,
    manifest: dict[str, Any] | None = None,
) -> WeightPlan:
    """Bytes per operator and layer for ``weight_format`` (or the manifest's per-layer record)."""
    head_format = head_format or compute_dtype
    dense_bits = DENSE_BITS.get(compute_dtype, 32.0)
    mlayers = _manifest_layers(manifest)
    layers: list[dict[str, OpWeights]] = []
    for i in range(shape.n_layers):
        ops: dict[str, OpWeights] = {}
        for sub, (o, n_in) in shape.linear_shapes().items():
            op = ops.setdefault(OP_OF_LINEAR[sub], OpWeights())
            rec = mlayers.get((i, sub))
            if rec is not None:
                nbytes, fmt, dense, emulated = _from_record(rec, (o, n_in), dense_bits)
            else:
                bits, dense = format_bits(weight_format, (o, n_in))
                nbytes, fmt, emulated = bits * o * n_in / 8.0, weight_format, False
            op.add(nbytes, o * n_in, fmt, dense, emulated)
        norms = OpWeights()
        norms.add(2 * shape.hidden * dense_bits / 8.0, 2 * shape.hidden, compute_dtype, True, False)
        ops["norms"] = norms
        layers.append(ops)
    emb_el = shape.vocab * shape.hidden
    emb_bits, emb_dense = format_bits(head_format, (shape.vocab, shape.hidden))
    embedding = OpWeights()
    embedding.add(emb_bits * emb_el / 8.0, emb_el, head_format, True, False)
    head = OpWeights()
    rec = mlayers.get((None, "lm_head"))
    if rec is not None:
        nbytes, fmt, dense, emulated = _from_record(rec, (shape.vocab, shape.hidden), dense_bits)
        head.add(nbytes, emb_el, fmt, dense, emulated)
    else:
        head.add(emb_bits * emb_el / 8.0, emb_el, head_format, emb_dense, False)
    return WeightPlan(layers, embedding, head, shape.tied_embeddings and rec is None)


def _manifest_layers(manifest: dict[str, Any] | None) -> dict[tuple[int | None, str], Any]:
    if not manifest:
        return {}
    layers = manifest.get("layers") or {}
    if not isinstance(layers, dict):
        raise ConfigError("manifest joules.json: 'layers' must map layer names to records")
    out: dict[tuple[int | None, str], Any] = {}
    for name, rec in layers.items():
        if not isinstance(rec, dict):
            raise ConfigError(f"manifest joules.json: layer {name!r} is not an object")
        if name.endswith("lm_head"):
            out[(None, "lm_head")] = rec
            continue
        m = _LAYER_RE.search(name)
        if m and m.group(2) in OP_OF_LINEAR:
            out[(int(m.group(1)), m.group(2))] = rec
    return out


def _from_record(
    rec: dict[str, Any], shape: tuple[int, int], dense_bits: float
) -> tuple[float, str, bool, bool]:
    el = shape[0] * shape[1]
    fmt = str(rec.get("format") or "?")
    if rec.get("nbytes") is not None:
        nbytes = float(rec["nbytes"])
    elif rec.get("bits_per_weight") is not None:
        nbytes = float(rec["bits_per_weight"]) * el / 8.0
    elif rec.get("format"):
        nbytes = format_bits(fmt, shape)[0] * el / 8.0
    else:
        raise ConfigError("manifest joules.json: a layer record has no nbytes, bits or format")
    dense = fmt.lower() in DENSE_BITS or nbytes * 8.0 / el >= dense_bits
    emulated = str(rec.get("path", "")).startswith("emulated")
    return nbytes, fmt, dense, emulated


def kv_policy(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's KV-cache runtime settings (``runtime.kv_cache``), or {}."""
    if not manifest:
        return {}
    rt = manifest.get("runtime") or {}
    kv = rt.get("kv_cache") if isinstance(rt, dict) else None
    return dict(kv) if isinstance(kv, dict) else {}
