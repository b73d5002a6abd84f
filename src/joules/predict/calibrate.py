"""Fit the roofline's effective peaks, overheads and energy coefficients to measured runs.

    >>> from joules.predict.calibrate import Observation, fit
    >>> # obs = observations_from_bench(json.load(open("benchmarks/results/decode.json")))
    >>> # cal = fit(obs, get_hardware("this-machine")); save_calibration(cal)

Latency. For one phase of one run, with each operator classified compute- or memory-bound,

    time = (sum of compute-bound FLOPs / peak) / flops_eff[phase]
         + (sum of memory-bound bytes / bandwidth) / bandwidth_eff
         + calls x overhead[phase] + dequantised elements x dequant_s

is linear in the unknowns (1/flops_eff[prefill], 1/flops_eff[decode], 1/bandwidth_eff,
overhead[prefill], overhead[decode], dequant_s). Decode has its own FLOP efficiency because its
matmuls have only batch-many rows and run far below prefill's large ones (on this CPU a batch-8
decode step takes ~1.7x a batch-1 step although both read the same weights); when no decode step
is compute-bound it is not identifiable and takes prefill's. They are fitted by bounded least
squares on *relative* residuals (each row divided by its measurement, so a 10 ms decode step weighs as much as a 2 s prefill), the operators are
re-classified with the new efficiencies, and the two steps repeat until the classification is
stable. Decode rows use the mean time per decode step (TPOT).

Energy: ``E = static_w x t + e_flop x FLOPs + e_byte x bytes`` per phase, by non-negative
least squares on relative residuals, ``t`` the measured time, fitted only from runs whose energy
a meter measured (method ``counter`` or ``sampled``). Energy the estimator made up (``estimated``:
CPU time x watts from the hardware table) is never fitted: the fit would reproduce the
estimator and validate nothing. With fewer than ``MIN_ENERGY_RUNS`` measured runs (llama.cpp
runs, latency-only results, a VM without RAPL) the catalog's energy coefficients are kept (TDP
and idle power, see ``Coefficients.uncalibrated``), never zeroed: zeroing them would turn
"calibrated" J/token into idle power x time, several times too low.

What the calibration says about itself: ``Coefficients.status`` names, per coefficient, whether
it was ``fitted`` or kept from the ``catalog`` (a latency unknown no run informs, such as the
dequantisation time of fp32-only runs, keeps its datasheet default too). A fitted coefficient
that sits at an arbitrary bound of the fit (an efficiency of 100x or 1/10,000 of the peak, an
overhead of a second per call) is recorded in ``Coefficients.degenerate``: the bound, not the
runs, set it, so the fit is a curve through the points rather than a roofline they validate,
and ``predict`` labels what it predicts with it ``predicted (degenerate fit: ...)``. A
non-negative coefficient at zero (no measurable overhead) is a physical limit, not degenerate.

The band: the 95th percentile of |predicted / measured - 1| over the fitted runs, per phase
(in-sample; ``benchmarks/predict_validation.py`` reports the leave-one-out error). Calibrations are
stored per machine under ``$JOULES_CACHE_DIR/predict/<hardware id>.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from joules.errors import ConfigError, DataError
from joules.paths import cache_dir
from joules.predict.catalog import HardwareSpec
from joules.predict.roofline import Coefficients, Workload, phase_ops
from joules.predict.shape import ModelShape
from joules.serialize import atomic_write_json

# Bounds of the fitted unknowns: efficiencies between 0.01 % and 100x the base peak. With a
# probe the fit stays well below 1; without one the base is a rough share of a catalogued host
# (see catalog.this_machine), which a real VM may exceed several times.
_INV_EFF_BOUNDS = (0.01, 1e4)
# Overheads per call and dequantisation time per element: non-negative, at most a second.
_TIME_BOUNDS = (0.0, 1.0)
# A fitted coefficient within this relative distance of an arbitrary bound sits at it.
BOUND_RTOL = 0.01
# Energy methods of a meter (joules.measure): only these are fitted, never "estimated".
MEASURED_ENERGY_METHODS = ("counter", "sampled")
# Runs with measured energy needed to fit the three energy coefficients.
MIN_ENERGY_RUNS = 3
# directness of the meter methods (an unknown method ranks below "estimated")
_METHOD_RANK = {"counter": 0, "sampled": 1, "estimated": 2}
LATENCY_COEFFICIENTS = (
    "flops_efficiency",
    "decode_flops_efficiency",
    "bandwidth_efficiency",
    "overhead_s.prefill",
    "overhead_s.decode",
    "dequant_s_per_element",
)
ENERGY_COEFFICIENTS = ("static_w", "e_flop_j", "e_byte_j", "max_power_w")


@dataclass
class Observation:
    """One measured run: what ran and what the bench saw (seconds, joules)."""

    shape: ModelShape
    workload: Workload
    weight_format: str
    prefill_s: float
    tpot_s: float | None
    prefill_energy_j: float | None = None
    decode_energy_j: float | None = None  # all decode steps
    manifest: dict[str, Any] | None = None
    label: str = ""
    # how the energies were obtained: "counter" | "sampled" | "estimated" (None: the
    # ``energy_method`` passed to :func:`fit`, else unknown, which is not fitted)
    energy_method: str | None = None


@dataclass
class Calibration:
    """Fitted coefficients of one machine, with the runs and residuals behind them."""

    hardware: str
    coefficients: Coefficients
    residuals: dict[str, list[float]] = field(default_factory=dict)
    n_points: int = 0
    energy_method: str | None = None  # the meter method of the energies fitted (None: none)
    notes: list[str] = field(default_factory=list)
    n_energy_runs: int = 0  # runs whose measured energy was fitted (0: catalog energy)

    @property
    def degenerate(self) -> dict[str, dict[str, Any]]:
        """Fitted coefficients at a bound of the fit (see ``Coefficients.degenerate``)."""
        return self.coefficients.degenerate

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coefficients"] = self.coefficients.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        d = dict(d)
        d["coefficients"] = Coefficients.from_dict(d["coefficients"])
        return cls(**d)


# -- features ------------------------------------------------------------------------------


def _phase_rows(obs: Observation, hw: HardwareSpec):
    """Per phase: a list of steps, each a list of (compute_s0, memory_s0, calls, dq, flops,
    bytes) of its operators at 100 % efficiency; and the measured target."""
    dtype = obs.workload.compute_dtype or hw.default_dtype
    fmt = obs.weight_format if obs.weight_format != "manifest" else dtype
    pre, steps, *_ = phase_ops(obs.shape, obs.workload, dtype, fmt, obs.manifest)

    def arr(ops) -> np.ndarray:
        return np.array(
            [
                (
                    o.flops / hw.flops_for(o.dtype),
                    o.nbytes / hw.bandwidth_bps,
                    o.calls,
                    o.dequant_elements,
                    o.flops,
                    o.nbytes,
                )
                for o in ops
            ]
        )

    rows = [("prefill", [arr(pre)], obs.prefill_s, 1)]
    if steps and obs.tpot_s:
        rows.append(("decode", [arr(s) for s in steps], obs.tpot_s, len(steps)))
    return rows


def _fit_latency(
    rows, max_iter: int, separate_decode: bool, default: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(theta, relative residuals, design matrix)``; theta = [1/flops_eff prefill, 1/bw_eff,
    overhead prefill, overhead decode, dequant_s, 1/flops_eff decode]. Without
    ``separate_decode`` decode's FLOP efficiency is prefill's; with it, it is at most prefill's
    (matmuls with fewer rows do not run faster). An unknown that no row informs keeps its
    ``default`` (the catalog's value, first five entries of theta)."""
    lo = np.array([_INV_EFF_BOUNDS[0], _INV_EFF_BOUNDS[0], *[_TIME_BOUNDS[0]] * 3])
    hi = np.array([_INV_EFF_BOUNDS[1], _INV_EFF_BOUNDS[1], *[_TIME_BOUNDS[1]] * 3])
    inv = (1.0, 1.0, 1.0)
    theta = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    seen: set[tuple[float, ...]] = set()
    for _ in range(max_iter):
        a, y = _design(rows, inv)
        theta = _solve(a, y, lo, hi, separate_decode, default)
        new = (float(theta[0]), float(theta[1]), float(theta[5]))
        if np.allclose(new, inv, rtol=1e-9) or new in seen:
            break
        seen.add(new)
        inv = new
    a, y = _design(rows, inv)
    return theta, a @ theta - 1.0, a  # predicted / measured - 1


def _solve(
    a: np.ndarray,
    y: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    separate: bool,
    default: np.ndarray,
):
    if separate and np.any(a[:, 5]):
        # decode's 1/eff = prefill's 1/eff + a non-negative excess
        b = np.column_stack([a[:, 0] + a[:, 5], a[:, 1:5], a[:, 5]])
        t = _bounded_lstsq(
            b,
            y,
            np.append(lo, 0.0),
            np.append(hi, _INV_EFF_BOUNDS[1]),
            np.append(default, 0.0),
        )
        return np.append(t[:5], t[0] + t[5])
    t = _bounded_lstsq(np.column_stack([a[:, 0] + a[:, 5], a[:, 1:5]]), y, lo, hi, default)
    return np.append(t, t[0])


def _cached_phase_rows(obs: Observation, hw: HardwareSpec):
    """:func:`_phase_rows`, computed once per observation and hardware (a leave-one-out
    validation fits the same runs dozens of times)."""
    cache = obs.__dict__.setdefault("_phase_rows_cache", {})
    if hw.id not in cache:
        cache[hw.id] = _phase_rows(obs, hw)
    return cache[hw.id]


def _design(rows, inv_eff: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix [x_compute prefill, x_memory, calls_prefill, calls_decode, dq,
    x_compute decode] / target; ``inv_eff`` = (1/flops_eff prefill, 1/bw_eff, 1/flops_eff
    decode) classifies each operator."""
    a_list, y_list = [], []
    for phase, steps, target, n in rows:
        x = np.zeros(6)
        inv_c = inv_eff[0] if phase == "prefill" else inv_eff[2]
        for s in steps:
            comp = s[:, 0] * inv_c >= s[:, 1] * inv_eff[1]
            x[0 if phase == "prefill" else 5] += s[comp, 0].sum()
            x[1] += s[~comp, 1].sum()
            x[2 if phase == "prefill" else 3] += s[:, 2].sum()
            x[4] += s[:, 3].sum()
        a_list.append(x / n / target)
        y_list.append(1.0)
    return np.array(a_list), np.array(y_list)


def _bounded_lstsq(
    a: np.ndarray,
    y: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    default: np.ndarray | None = None,
) -> np.ndarray:
    """Least squares with box bounds (active set: clip, fix, re-solve; a handful of unknowns).
    An unknown no row informs is pinned at ``default`` (else its lower bound): it is not
    fitted, and a bound would pass for a fitted value."""
    n = a.shape[1]
    fixed: dict[int, float] = {}
    for j in range(n):
        if not np.any(a[:, j]):
            fixed[j] = float(default[j]) if default is not None else lo[j]
    for _ in range(2 * n + 1):
        free = [j for j in range(n) if j not in fixed]
        rhs = y - sum((a[:, j] * v for j, v in fixed.items()), np.zeros_like(y))
        x = np.zeros(n)
        for j, v in fixed.items():
            x[j] = v
        if free:
            sol, *_ = np.linalg.lstsq(a[:, free], rhs, rcond=None)
            x[free] = sol
        bad = [j for j in free if x[j] < lo[j] or x[j] > hi[j]]
        if not bad:
            return x
        worst = max(bad, key=lambda j: max(lo[j] - x[j], x[j] - hi[j]) / max(abs(hi[j]), 1e-30))
        fixed[worst] = lo[worst] if x[worst] < lo[worst] else hi[worst]
    return np.clip(x, lo, hi)


def fit(
    observations: list[Observation],
    hw: HardwareSpec,
    *,
    max_iter: int = 20,
    energy_method: str | None = None,
) -> Calibration:
    """Calibrate ``hw``'s coefficients on measured runs (see the module docstring).

    ``energy_method``: how the runs' energies were obtained, for observations that do not say
    (``counter``, ``sampled`` or ``estimated``); only measured energy is fitted."""
    if len(observations) < 3:
        raise ConfigError(f"calibration needs at least 3 measured runs, got {len(observations)}")
    catalog = Coefficients.uncalibrated(hw)
    # catalog values of theta's first five unknowns, kept where no run informs them
    default = np.array([1.0, 1.0, 0.0, 0.0, catalog.dequant_s_per_element])
    rows = [r for o in observations for r in _cached_phase_rows(o, hw)]
    theta, rel, a = _fit_latency(rows, max_iter, separate_decode=False, default=default)
    # Decode's own FLOP efficiency is kept only when it explains the runs clearly better (a
    # quarter less RMS error): with decode memory-bound it is not identifiable and would trade
    # off against the bandwidth efficiency.
    theta2, rel2, a2 = _fit_latency(rows, max_iter, separate_decode=True, default=default)
    if np.sqrt(np.mean(rel2**2)) < 0.75 * np.sqrt(np.mean(rel**2)):
        theta, rel, a = theta2, rel2, a2
    separate = bool(theta[5] != theta[0])
    residuals: dict[str, list[float]] = {"prefill": [], "decode": []}
    for (phase, *_), r in zip(rows, rel, strict=True):
        residuals[phase].append(float(r))
    band = {p: _p95(r) for p, r in residuals.items() if r}
    status, degenerate = _latency_status(theta, a, separate)
    coef = Coefficients(
        flops_efficiency=1.0 / theta[0],
        decode_flops_efficiency=1.0 / theta[5] if separate else None,
        bandwidth_efficiency=1.0 / theta[1],
        overhead_s={"prefill": float(theta[2]), "decode": float(theta[3])},
        dequant_s_per_element=float(theta[4]),
        static_w=catalog.static_w,
        e_flop_j=catalog.e_flop_j,
        e_byte_j=catalog.e_byte_j,
        max_power_w=catalog.max_power_w,
        calibrated=True,
        band=band,
        n_points=len(observations),
        source=f"calibrated on {len(observations)} measured runs",
        status=status | dict.fromkeys(ENERGY_COEFFICIENTS, "catalog"),
        degenerate=degenerate,
    )
    coef, e_res, e_info = _fit_energy(observations, hw, coef, energy_method)
    if e_res:
        residuals.update({f"energy_{k}": v for k, v in e_res.items()})
    notes = list(e_info["notes"])
    if degenerate:
        notes.insert(
            0,
            f"degenerate fit: {coef.degenerate_summary()} (the bound, not the runs, set it: "
            "a curve through these points, not a validated roofline)",
        )
    return Calibration(
        hw.id,
        coef,
        residuals,
        len(observations),
        e_info["method"],
        notes,
        e_info["n_runs"],
    )


def _at(value: float, limit: float) -> bool:
    return abs(value - limit) <= BOUND_RTOL * abs(limit)


def _latency_status(
    theta: np.ndarray, a: np.ndarray, separate: bool
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Per latency coefficient ``fitted`` or ``catalog`` (no run informs it: its design column
    is zero), and the fitted ones at an arbitrary bound. Efficiencies are fitted as their
    inverse: 1/eff at its lower bound is the efficiency at its upper bound."""
    informed = {
        "flops_efficiency": bool(np.any(a[:, 0]) or (not separate and np.any(a[:, 5]))),
        "decode_flops_efficiency": bool(np.any(a[:, 5])) if separate else False,
        "bandwidth_efficiency": bool(np.any(a[:, 1])),
        "overhead_s.prefill": bool(np.any(a[:, 2])),
        "overhead_s.decode": bool(np.any(a[:, 3])),
        "dequant_s_per_element": bool(np.any(a[:, 4])),
    }
    status = {k: "fitted" if v else "catalog" for k, v in informed.items()}
    if not separate:  # decode's FLOP efficiency is prefill's: fitted or not with it
        status["decode_flops_efficiency"] = status["flops_efficiency"]
    degenerate: dict[str, dict[str, Any]] = {}
    inv_lo, inv_hi = _INV_EFF_BOUNDS
    effs = [("flops_efficiency", theta[0]), ("bandwidth_efficiency", theta[1])]
    if separate:
        effs.append(("decode_flops_efficiency", theta[5]))
    for name, inv in effs:
        if status[name] != "fitted":
            continue
        if _at(float(inv), inv_lo):
            degenerate[name] = {"bound": "upper", "limit": 1.0 / inv_lo, "value": 1.0 / inv}
        elif _at(float(inv), inv_hi):
            degenerate[name] = {"bound": "lower", "limit": 1.0 / inv_hi, "value": 1.0 / inv}
    for name, j in (("overhead_s.prefill", 2), ("overhead_s.decode", 3)):
        if status[name] == "fitted" and _at(float(theta[j]), _TIME_BOUNDS[1]):
            degenerate[name] = {"bound": "upper", "limit": _TIME_BOUNDS[1], "value": theta[j]}
    if status["dequant_s_per_element"] == "fitted" and _at(float(theta[4]), _TIME_BOUNDS[1]):
        degenerate["dequant_s_per_element"] = {
            "bound": "upper",
            "limit": _TIME_BOUNDS[1],
            "value": float(theta[4]),
        }
    return status, {k: {**v, "value": float(v["value"])} for k, v in degenerate.items()}


def _p95(r: list[float]) -> float:
    return float(np.quantile(np.abs(np.array(r)), 0.95)) if r else float("nan")


def _is_measured(method: str | None) -> bool:
    """A meter's energy (``counter``/``sampled``, possibly with a qualifier after a space)."""
    return bool(method) and str(method).split()[0].lower() in MEASURED_ENERGY_METHODS


def _fit_energy(
    observations: list[Observation],
    hw: HardwareSpec,
    coef: Coefficients,
    energy_method: str | None = None,
) -> tuple[Coefficients, dict[str, list[float]], dict[str, Any]]:
    """Fit static W, J/FLOP and J/byte on the runs whose energy a meter measured; with fewer
    than ``MIN_ENERGY_RUNS`` of them ``coef`` keeps its (catalog) energy coefficients. Returns
    the coefficients, the energy residuals per phase and ``{"n_runs", "method", "notes"}``."""
    rows, targets, phases = [], [], []
    n_runs, n_estimated, n_unknown = 0, 0, 0
    methods: set[str] = set()
    for o in observations:
        if not (o.prefill_energy_j or o.decode_energy_j):
            continue
        method = o.energy_method or energy_method
        if not _is_measured(method):
            if method and str(method).split()[0].lower() == "estimated":
                n_estimated += 1
            else:
                n_unknown += 1
            continue
        dtype = o.workload.compute_dtype or hw.default_dtype
        fmt = o.weight_format if o.weight_format != "manifest" else dtype
        pre, steps, *_ = phase_ops(o.shape, o.workload, dtype, fmt, o.manifest)
        used = False
        if o.prefill_energy_j:
            f, b = sum(x.flops for x in pre), sum(x.nbytes for x in pre)
            rows.append((o.prefill_s, f, b))
            targets.append(o.prefill_energy_j)
            phases.append("prefill")
            used = True
        if o.decode_energy_j and o.tpot_s and steps:
            f = sum(x.flops for s in steps for x in s)
            b = sum(x.nbytes for s in steps for x in s)
            rows.append((o.tpot_s * len(steps), f, b))
            targets.append(o.decode_energy_j)
            phases.append("decode")
            used = True
        if used:
            n_runs += 1
            methods.add(str(method).split()[0].lower())
    notes = []
    if n_estimated:
        notes.append(
            f"{n_estimated} run(s) carry *estimated* energy (no RAPL/NVML): not fitted, since "
            "energy coefficients fitted to the estimator would only reproduce it"
        )
    if n_unknown:
        notes.append(
            f"{n_unknown} run(s) carry energy without a meter method (counter, sampled or "
            "estimated): not fitted"
        )
    if n_runs < MIN_ENERGY_RUNS:
        notes.append(
            f"energy coefficients from the catalog ({hw.id}: idle power, TDP and datasheet "
            f"peaks), not fitted: {n_runs} run(s) with measured energy, {MIN_ENERGY_RUNS} "
            "needed"
        )
        return coef, {}, {"n_runs": 0, "method": None, "notes": notes}
    a = np.array(rows, dtype=float) / np.array(targets)[:, None]
    # scale columns to comparable magnitudes before solving
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x = _bounded_lstsq(a / scale, np.ones(len(rows)), np.zeros(3), np.full(3, np.inf)) / scale
    rel = a @ x - 1.0
    res: dict[str, list[float]] = {}
    for p, r in zip(phases, rel, strict=True):
        res.setdefault(p, []).append(float(r))
    coef = replace(
        coef,
        static_w=float(x[0]),
        e_flop_j=float(x[1]),
        e_byte_j=float(x[2]),
        max_power_w=None,
        energy_band={p: _p95(r) for p, r in res.items()},
        # a fitted energy model is not capped: no max_power_w to attribute
        status={k: v for k, v in coef.status.items() if k != "max_power_w"}
        | dict.fromkeys(ENERGY_COEFFICIENTS[:3], "fitted"),
    )
    # the least direct method of those fitted (counter < sampled)
    method = max(methods, key=MEASURED_ENERGY_METHODS.index)
    return coef, res, {"n_runs": n_runs, "method": method, "notes": notes}


# -- bench results --------------------------------------------------------------------------


def _get(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = row.get(k)
        if isinstance(v, dict):  # {"median": x, ...}
            v = v.get("median", v.get("mean"))
        if v is not None:
            return v
    return None


def observations_from_bench(
    result: dict[str, Any], shape: ModelShape | None = None, weight_format: str | None = None
) -> tuple[list[Observation], str | None]:
    """Observations from a ``BenchResult.to_dict()`` (rows with prompt_len, batch, gen_len,
    ttft_s, tpot_s, per-phase energy) and the energy method found, read defensively."""
    rows = result.get("rows") or result.get("results") or result.get("points")
    if not isinstance(rows, list) or not rows:
        raise DataError("bench results: no 'rows' list: pass the JSON of `joules bench --json`")
    if shape is None:
        model = result.get("model") or {}
        spec = (model.get("path") or model.get("spec")) if isinstance(model, dict) else model
        if not spec:
            raise DataError("bench results name no model: pass the model to calibrate against")
        shape, manifest = ModelShape.load(spec)
    else:
        manifest = None
    fmt = weight_format or str(result.get("weight_format") or result.get("format") or "fp32")
    dtype = result.get("compute_dtype") or result.get("dtype")
    method = None
    out = []
    for r in rows:
        p, g, b = _get(r, "prompt_len"), _get(r, "gen_len"), _get(r, "batch") or 1
        ttft = _get(r, "ttft_s", "prefill_s")
        tpot = _get(r, "tpot_s", "tpot_mean_s", "decode_s_per_token")
        if p is None or g is None or ttft is None:
            raise DataError("bench results: a row lacks prompt_len, gen_len or ttft_s")
        e_pre = _get(r, "prefill_energy_j", "energy_prefill_j")
        e_dec = _get(r, "decode_energy_j", "energy_decode_j")
        row_methods = [_get(r, "energy_method", "method")]
        # joules bench: {"prefill_energy": {"median_j": ..., "method": ...}, "decode_energy": ...}
        for key in ("prefill_energy", "decode_energy"):
            pe = r.get(key)
            if isinstance(pe, dict) and pe.get("median_j") is not None:
                if key == "prefill_energy":
                    e_pre = pe["median_j"]
                else:
                    e_dec = pe["median_j"]
                row_methods.append(pe.get("method"))
        known = [str(m) for m in row_methods if m]
        # a row's energy is as direct as its least direct phase (estimated < sampled < counter)
        row_method = (
            max(known, key=lambda m: _METHOD_RANK.get(m.split()[0].lower(), len(_METHOD_RANK)))
            if known
            else result.get("energy_method")
        )
        method = method or row_method
        wl = Workload(
            int(p),
            int(g),
            int(b),
            compute_dtype=dtype if dtype in ("fp32", "bf16", "fp16") else None,
        )
        out.append(
            Observation(
                shape,
                wl,
                str(r.get("weight_format") or fmt),
                float(ttft),
                float(tpot) if tpot else None,
                float(e_pre) if e_pre else None,
                float(e_dec) if e_dec else None,
                manifest,
                label=f"p{p} g{g} b{b}",
                energy_method=str(row_method) if row_method else None,
            )
        )
    return out, method or result.get("energy_method")


# -- storage -------------------------------------------------------------------------------


def calibration_path(hardware_id: str) -> Path:
    return cache_dir() / "predict" / f"{hardware_id}.json"


def save_calibration(cal: Calibration) -> Path:
    path = calibration_path(cal.hardware)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cal.to_dict(), indent=2, default=_nan_none)
    return path


def _nan_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def load_calibration(hardware_id: str) -> Calibration | None:
    """The stored calibration of ``hardware_id``, or None (a corrupt file is ignored)."""
    path = calibration_path(hardware_id)
    if not path.is_file():
        return None
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
