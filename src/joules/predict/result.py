"""``Prediction``: what the analytic model says a run will cost, labelled ``predicted``.

>>> from joules.predict import ModelShape, Workload, predict
>>> s = ModelShape("t", "llama", 2, 64, 4, 2, 16, 128, 384)
>>> p = predict(s, "h100", Workload(prompt_len=16, gen_len=4))
>>> p.method, p.hardware, p.calibrated
('predicted', 'nvidia-h100-sxm', False)
>>> Prediction.from_dict(p.to_dict()) == p
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from joules.predict.roofline import OpCost


@dataclass
class Prediction:
    """Predicted latency, throughput, energy and memory of one (model, format, workload,
    hardware). ``band`` holds the relative 95 % half-width per phase from the calibration's
    residuals (empty when the hardware is uncalibrated: no band is claimed)."""

    model: str
    hardware: str
    hardware_name: str
    weight_format: str
    compute_dtype: str
    workload: dict[str, Any]
    calibrated: bool
    coefficients_source: str
    # latency
    prefill_s: float  # time to first token
    decode_s: float  # all decode steps after the first token
    tpot_s: float  # time per output token after the first (nan when gen_len == 1)
    prefill_tok_s: float
    decode_tok_s: float
    # energy
    prefill_energy_j: float
    decode_energy_j: float
    decode_j_per_token: float
    j_per_token: float  # (prefill + decode) energy / generated tokens
    # memory
    weights_bytes: float
    kv_cache_bytes: float
    activation_bytes: float
    peak_memory_bytes: float
    fits_in_memory: bool
    bits_per_weight: float
    operators: list[OpCost] = field(default_factory=list)
    band: dict[str, float] = field(default_factory=dict)
    energy_band: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # "predicted"; "predicted (degenerate fit: <coefficient> at its <upper|lower> bound <x>)"
    # when a calibrated coefficient sits at a bound of its fit (not a validated roofline)
    method: str = "predicted"

    @property
    def degenerate_fit(self) -> bool:
        """Whether the calibration behind this prediction is degenerate (see ``method``)."""
        return self.method.startswith("predicted (degenerate fit")

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    def interval(self, phase: str) -> tuple[float, float] | None:
        """(low, high) of the phase's latency (prefill_s or tpot_s), or None if uncalibrated."""
        if phase not in self.band:
            return None
        v = self.prefill_s if phase == "prefill" else self.tpot_s
        r = self.band[phase]
        return v * max(0.0, 1.0 - r), v * (1.0 + r)

    def bound(self, phase: str) -> str:
        """Which roof limits the phase overall: the bound of its costliest operators."""
        ops = [o for o in self.operators if o.phase == phase]
        c = sum(o.time_s for o in ops if o.bound == "compute")
        m = sum(o.time_s for o in ops if o.bound == "memory")
        return "compute" if c >= m else "memory"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["operators"] = [o.to_dict() for o in self.operators]
        d["total_s"] = self.total_s
        d["energy_j"] = self.energy_j
        d["prefill_bound"] = self.bound("prefill")
        d["decode_bound"] = self.bound("decode")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prediction:
        d = {k: v for k, v in d.items() if k not in ("total_s", "energy_j") and "_bound" not in k}
        d["operators"] = [OpCost.from_dict(o) for o in d.get("operators", [])]
        return cls(**d)
