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
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FILE = "joules.json"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    recipe: str = "baseline"
    recipe_steps: list[dict[str, Any]] = field(default_factory=list)
    source_model: str = ""
    prequantized: str | None = None
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
    version: int = MANIFEST_VERSION

    def record(self, layer: str, **fields: Any) -> None:
        """Merge ``fields`` into the manifest entry of ``layer``."""
        self.layers.setdefault(layer, {}).update(fields)

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
        }
