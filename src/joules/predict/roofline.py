"""Per-operator FLOPs and bytes of one forward pass, and their time and energy on a machine.

    >>> from joules.predict.shape import ModelShape
    >>> from joules.predict.weights import weight_plan
    >>> from joules.predict.roofline import Forward, forward_ops
    >>> s = ModelShape("t", "llama", 1, 8, 2, 1, 4, 16, 32)
    >>> ops = forward_ops(s, weight_plan(s, "fp32", "fp32"), Forward(batch=1, new_tokens=1,
    ...     context=1), "fp32", kv_bytes=4.0)
    >>> [(o.name, o.flops) for o in ops][:3]        # qkv: 2 x 1 token x 8 x (8 + 2 x 4)
    [('embedding', 0.0), ('attn_norm', 32.0), ('qkv_proj', 256.0)]

Operators of one decoder layer (``N`` = batch x new tokens, ``P`` = (query, key) pairs
attended, ``K`` = keys read per sequence, ``a`` = activation bytes, ``k`` = KV bytes):

============  ==============================  ==================================================
operator      FLOPs                           bytes moved
============  ==============================  ==================================================
attn_norm     4 N d                           2 N d a + weight
qkv_proj      2 N d (q + 2 kv)                weights + N d a + N q a + 2 N kv k (K, V written)
attn_scores   2 h dh P                        N q a + b K kv k  (K read once)
softmax       5 h P                           0 (fused: scores stay on chip)
attn_values   2 h dh P                        b K kv k + N q a  (V read, output written)
o_proj        2 N q d                         weights + N q a + N d a
mlp_norm      4 N d                           2 N d a + weight
mlp           2 N d f m  (m = 2 or 3 matrices) weights + 2 N d a + 2 N f a
============  ==============================  ==================================================

plus ``embedding`` (N d rows gathered), ``final_norm`` and ``lm_head`` (2 b d V FLOPs for the
last position of each sequence, fp32 logits written). RoPE and residual adds are left out
(elementwise, well under 1 % of the bytes). This is a speed-of-light count: attention is taken
as fused (flash-style), every weight is read once per forward.

Time of an operator = max(FLOPs / (peak x flops_efficiency[phase]), bytes / (bandwidth x
bandwidth_efficiency)) + overhead per operator call + dequantised elements x dequant_s.
Energy = static_w x time + e_flop_j x FLOPs + e_byte_j x bytes (capped at ``max_power_w`` x
time when uncalibrated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from joules.errors import ConfigError
from joules.predict.catalog import DTYPE_BYTES, HardwareSpec
from joules.predict.shape import ModelShape
from joules.predict.weights import DENSE_BITS, WeightPlan, kv_policy, weight_plan

# Dequantising one weight element: unpack, subtract zero, scale, convert (~4 vector ops).
DEQUANT_OPS_PER_ELEMENT = 4.0
# Uncalibrated energy split: a kernel at the compute roof draws TDP; one at the bandwidth roof
# draws idle + this share of the dynamic range (memory-bound decode runs below TDP).
MEMORY_POWER_SHARE = 0.5


@dataclass(frozen=True)
class Workload:
    """What is run: ``batch`` sequences of ``prompt_len`` tokens, then ``gen_len`` generated."""

    prompt_len: int = 512
    gen_len: int = 128
    batch: int = 1
    compute_dtype: str | None = None  # None: the hardware's default (fp32 on CPU, bf16 on GPU)
    kv_dtype: str | None = None  # None: the compute dtype (a manifest's KV format overrides)

    def __post_init__(self) -> None:
        for k in ("prompt_len", "gen_len", "batch"):
            if getattr(self, k) < 1:
                raise ConfigError(f"workload {k} must be >= 1, got {getattr(self, k)}")
        for k in ("compute_dtype", "kv_dtype"):
            v = getattr(self, k)
            if v is not None and v not in DTYPE_BYTES:
                raise ConfigError(f"workload {k} {v!r}: use one of {', '.join(DTYPE_BYTES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)


@dataclass(frozen=True)
class Coefficients:
    """The knobs of the model for one machine: efficiencies, overheads, energy per unit."""

    flops_efficiency: float = 1.0  # achieved / peak FLOP/s
    # decode's matmuls have few rows (batch x 1 token): their achieved FLOP/s is fitted apart
    # from prefill's large ones when a calibration has compute-bound decode steps (None: same)
    decode_flops_efficiency: float | None = None
    bandwidth_efficiency: float = 1.0  # achieved / peak bytes/s
    overhead_s: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    dequant_s_per_element: float = 0.0
    static_w: float = 0.0
    e_flop_j: float = 0.0
    e_byte_j: float = 0.0
    max_power_w: float | None = None
    calibrated: bool = False
    # relative residuals of the calibration per phase (95th percentile of |pred/meas - 1|)
    band: dict[str, float] = field(default_factory=dict)
    energy_band: dict[str, float] = field(default_factory=dict)
    n_points: int = 0
    source: str = "uncalibrated: datasheet peaks (speed of light)"
    # Where each coefficient came from, by name (``overhead_s.prefill`` for a phase's entry):
    # "fitted" (estimated from measured runs) or "catalog" (the datasheet default of
    # :meth:`uncalibrated`, kept because the runs could not inform it; ``max_power_w``, the
    # TDP cap, is listed only then). Empty: uncalibrated, or a calibration stored before
    # joules recorded it.
    status: dict[str, str] = field(default_factory=dict)
    # Fitted coefficients that sit at an arbitrary bound of the fit (an efficiency of 100x the
    # peak, say): by name, {"bound": "upper" | "lower", "limit": the bound, "value": the fit}.
    # Such a fit is not a roofline the runs validate (the bound, not the data, set that
    # coefficient), and predictions made with it say so.
    degenerate: dict[str, dict[str, Any]] = field(default_factory=dict)

    def degenerate_summary(self) -> str:
        """``"bandwidth_efficiency at its upper bound 100"`` (one clause per coefficient), or
        "" when no fitted coefficient sits at a bound."""
        return "; ".join(
            f"{name} at its {d['bound']} bound {d['limit']:g}"
            for name, d in sorted(self.degenerate.items())
        )

    @classmethod
    def uncalibrated(cls, hw: HardwareSpec) -> Coefficients:
        dyn = max(hw.tdp_w - hw.idle_w, 0.0)
        return cls(
            dequant_s_per_element=DEQUANT_OPS_PER_ELEMENT / hw.vector_flops,
            static_w=hw.idle_w,
            e_flop_j=dyn / hw.flops_for(hw.default_dtype),
            e_byte_j=MEMORY_POWER_SHARE * dyn / hw.bandwidth_bps,
            max_power_w=hw.tdp_w,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coefficients:
        return cls(**d)


@dataclass(frozen=True)
class Forward:
    """One forward pass: ``new_tokens`` per sequence attending to ``context`` positions
    (including the new ones), ``window`` the attention span (None: all)."""

    batch: int
    new_tokens: int
    context: int


@dataclass
class Op:
    """FLOPs and bytes of one operator summed over the layers (and steps) it covers."""

    name: str
    flops: float
    nbytes: float
    dtype: str  # compute dtype of its FLOPs
    calls: int  # kernel launches / dispatches (layers x steps)
    dequant_elements: float = 0.0

    def merged(self, other: Op) -> Op:
        return Op(
            self.name,
            self.flops + other.flops,
            self.nbytes + other.nbytes,
            self.dtype,
            self.calls + other.calls,
            self.dequant_elements + other.dequant_elements,
        )


def _pairs(new: int, context: int, span: int | None) -> tuple[float, int]:
    """(query-key pairs, keys read) for ``new`` causal queries ending at position ``context``."""
    start = context - new  # positions already cached
    span = span or context
    pairs = sum(min(start + i, span) for i in range(1, new + 1))
    return float(pairs), min(context, span)


def forward_ops(
    shape: ModelShape,
    plan: WeightPlan,
    fw: Forward,
    dtype: str,
    kv_bytes: float,
    *,
    attend: int | None = None,
) -> list[Op]:
    """Per-operator FLOPs and bytes of one forward pass, summed over the layers.

    ``attend`` caps the positions each query sees (a sinks/window or heavy-hitter KV policy)."""
    a = float(DTYPE_BYTES[dtype])
    b, d, f = fw.batch, shape.hidden, shape.intermediate
    q, kv, h, dh = shape.q_dim, shape.kv_dim, shape.n_heads, shape.head_dim
    n = b * fw.new_tokens
    acc: dict[str, Op] = {}

    def add(name: str, flops: float, nbytes: float, dq: float = 0.0, calls: int = 1) -> None:
        op = Op(name, float(flops), float(nbytes), dtype, calls, float(dq))
        acc[name] = acc[name].merged(op) if name in acc else op

    emb_bytes = plan.embedding.nbytes / max(plan.embedding.elements, 1)
    add("embedding", 0, n * d * (emb_bytes + a))
    for i, w in enumerate(plan.layers):
        span = shape.sliding_window if shape.is_sliding(i) else None
        if attend is not None:
            span = min(span, attend) if span else attend
        pairs, keys = _pairs(fw.new_tokens, fw.context, span)
        norm_w = w["norms"].nbytes / 2

        def linear(name: str, flops: float, act_bytes: float, w=w) -> None:
            ow = w[name]
            extra = 2.0 * ow.emulated_elements * a  # dense copy written, then read by the matmul
            add(name, flops, ow.nbytes + act_bytes + extra, ow.dequant_elements)

        add("attn_norm", 4 * n * d, 2 * n * d * a + norm_w)
        linear("qkv_proj", 2 * n * d * (q + 2 * kv), n * d * a + n * q * a + 2 * n * kv * kv_bytes)
        add("attn_scores", 2 * h * dh * pairs * b, n * q * a + b * keys * kv * kv_bytes)
        add("softmax", 5 * h * pairs * b, 0.0)
        add("attn_values", 2 * h * dh * pairs * b, b * keys * kv * kv_bytes + n * q * a)
        linear("o_proj", 2 * n * q * d, n * q * a + n * d * a)
        add("mlp_norm", 4 * n * d, 2 * n * d * a + norm_w)
        linear("mlp", 2 * n * d * f * shape.mlp_matrices, 2 * n * d * a + 2 * n * f * a)
    add("final_norm", 4 * n * d, 2 * n * d * a + d * a)
    head = plan.lm_head
    extra = 2.0 * head.emulated_elements * a
    add(
        "lm_head",
        2 * b * d * shape.vocab,
        head.nbytes + b * d * a + b * shape.vocab * 4 + extra,
        head.dequant_elements,
    )
    return list(acc.values())


@dataclass
class OpCost:
    """One operator's predicted cost in one phase."""

    phase: str
    name: str
    flops: float
    nbytes: float
    compute_s: float
    memory_s: float
    overhead_s: float
    dequant_s: float
    time_s: float
    energy_j: float
    bound: str  # "compute" | "memory"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpCost:
        return cls(**d)


def op_cost(op: Op, phase: str, hw: HardwareSpec, c: Coefficients) -> OpCost:
    """Time and energy of one operator on ``hw`` with coefficients ``c``."""
    eff = c.flops_efficiency
    if phase == "decode" and c.decode_flops_efficiency is not None:
        eff = c.decode_flops_efficiency
    compute_s = op.flops / (hw.flops_for(op.dtype) * eff)
    memory_s = op.nbytes / (hw.bandwidth_bps * c.bandwidth_efficiency)
    overhead = op.calls * c.overhead_s.get(phase, 0.0)
    dq = op.dequant_elements * c.dequant_s_per_element
    t = max(compute_s, memory_s) + overhead + dq
    e = c.static_w * t + c.e_flop_j * op.flops + c.e_byte_j * op.nbytes
    if c.max_power_w is not None:
        e = min(e, c.max_power_w * t)
    bound = "compute" if compute_s >= memory_s else "memory"
    return OpCost(
        phase, op.name, op.flops, op.nbytes, compute_s, memory_s, overhead, dq, t, e, bound
    )


def kv_bytes_per_element(dtype: str, policy: dict[str, Any], head_dim: int) -> float:
    """Bytes per cached K or V element: the policy's format (``formats.get``) or ``dtype``."""
    fmt = policy.get("format")
    if not fmt:
        return float(DTYPE_BYTES[dtype])
    low = str(fmt).lower()
    if low in DENSE_BITS:
        return DENSE_BITS[low] / 8.0
    from joules import formats

    group = int(policy.get("group") or head_dim)
    return float(formats.get(str(fmt)).bits_per_element((1, max(group, head_dim)))) / 8.0


def attend_limit(policy: dict[str, Any], context: int) -> int | None:
    """Positions a query attends to under a KV policy (None: all)."""
    kind = str(policy.get("policy") or "full")
    if kind == "sinks":
        return int(policy.get("n_sinks", 4)) + int(policy.get("window") or context)
    if kind in ("heavy_hitters", "h2o"):
        budget = float(policy.get("budget") or 1.0)
        return max(1, int(budget * context) if budget <= 1.0 else int(budget))
    return None


def phase_ops(
    shape: ModelShape,
    workload: Workload,
    dtype: str,
    weight_format: str,
    manifest: dict[str, Any] | None = None,
    head_format: str | None = None,
) -> tuple[list[Any], list[list[Any]], Any, float, dict[str, Any]]:
    """(prefill ops, decode ops per step, weight plan, KV bytes/element, KV policy)."""
    plan = weight_plan(shape, weight_format, dtype, head_format=head_format, manifest=manifest)
    policy = kv_policy(manifest)
    kv_b = kv_bytes_per_element(workload.kv_dtype or dtype, policy, shape.head_dim)
    b, p = workload.batch, workload.prompt_len
    pre = forward_ops(shape, plan, Forward(b, p, p), dtype, kv_b, attend=attend_limit(policy, p))
    steps = []
    for i in range(1, workload.gen_len):
        ctx = p + i
        fw = Forward(b, 1, ctx)
        steps.append(forward_ops(shape, plan, fw, dtype, kv_b, attend=attend_limit(policy, ctx)))
    return pre, steps, plan, kv_b, policy
