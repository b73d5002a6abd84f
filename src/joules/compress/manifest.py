"""The manifest of a compressed model: what was done to it, and what it costs in bits.

    >>> from joules.compress.manifest import Manifest
    >>> m = Manifest(recipe="rtn(format=int8-ch)")
    >>> Manifest.from_dict(m.to_dict()) == m
    True

Written as ``joules.json`` beside the safetensors of a compressed directory. ``layers`` has one
entry per compressed module (format, bits/weight, bytes...); ``modules`` lists the module types
a loader must rebuild; ``runtime`` holds model-level settings re-applied at load (e.g. a KV-cache
policy); ``steps`` the time and peak memory of each step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FILE = "joules.json"
MANIFEST_VERSION = 1


def sqnr_db(signal_sq: float, noise_sq: float) -> float | None:
    """10·log10(signal / noise) in dB; None when there is no noise (or no signal)."""
    if noise_sq <= 0 or signal_sq <= 0:
        return None
    return 10.0 * math.log10(signal_sq / noise_sq)


@dataclass
class Manifest:
    recipe: str = "baseline"
    recipe_steps: list[dict[str, Any]] = field(default_factory=list)
    source_model: str = ""
    prequantized: str | None = None
    # joules.models.info.SYNTHETIC_LABEL when the source model's weights are random
    synthetic: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bits_per_weight: float | None = None
    targeted_parameters: int = 0
    model_bytes: int = 0
    model_parameters: int = 0
    model_bits_per_weight: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # A step whose result is a file made by another tool (llama.cpp's quantizer, the peer):
    # path, size_bytes, sha256 and tensor types of that file, which is what ships
    gguf_file: dict[str, Any] | None = None
    # What a GGUF export of this directory stores for the tensors compression left float, as a
    # byte budget counted them (gguf_mix, --target-size): embedding / output types, the mix
    gguf_export: dict[str, Any] | None = None
    version: int = MANIFEST_VERSION

    def record(self, layer: str, **fields: Any) -> None:
        """Merge ``fields`` into the manifest entry of ``layer``."""
        self.layers.setdefault(layer, {}).update(fields)

    def record_weight_error(self, layer: str, reference: Any, stored: Any) -> None:
        """Record the weight SQNR of ``layer``: the dense weight a step received (``reference``)
        against the weight it stores now (``stored``, as the layer decodes it), both tensors.

        Writes ``sqnr_db`` = 10·log10(‖W‖² / ‖W − Ŵ‖²) (None when Ŵ = W exactly) and the two
        sums it comes from (``weight_signal_sq``, ``weight_noise_sq``). A second step on the same
        layer (prune, then quantize) adds its noise to the first's and keeps the first
        reference, so ``sqnr_db`` stays against the weight as loaded; this is exact when the
        errors do not overlap (quantization keeps pruned weights at zero), an approximation
        otherwise. Steps that rescale weights exactly (smoothing, AWQ's scales folded into the
        previous layer) record nothing: a later quantization is measured on the scaled weight.
        """
        import torch  # lazy: reading a manifest needs no torch

        ref = reference.detach().float()
        # float64 sums: a 4096×11008 layer's squares summed in fp32 lose digits.
        signal = float(ref.pow(2).sum(dtype=torch.float64))
        noise = float((stored.detach().float() - ref).pow(2).sum(dtype=torch.float64))
        entry = self.layers.setdefault(layer, {})
        if "weight_signal_sq" in entry:
            signal = float(entry["weight_signal_sq"])
            noise += float(entry["weight_noise_sq"])
        entry["weight_signal_sq"] = signal
        entry["weight_noise_sq"] = noise
        entry["sqnr_db"] = sqnr_db(signal, noise)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(Manifest)}
        return Manifest(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> dict[str, Any]:
        """The few fields a report line needs."""
        formats = sorted({str(v.get("format")) for v in self.layers.values() if v.get("format")})
        return {
            "recipe": self.recipe,
            "bits_per_weight": self.bits_per_weight,
            "model_bytes": self.model_bytes,
            "model_bits_per_weight": self.model_bits_per_weight,
            "formats": formats,
            "prequantized": self.prequantized,
            "synthetic": self.synthetic,
        }
