"""``predict(shape, hardware, workload, weight_format=...)``: the speed-of-light model, end to end.

    >>> from joules.predict import ModelShape, Workload, predict
    >>> s = ModelShape.from_config({"model_type": "llama", "hidden_size": 4096,
    ...     "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
    ...     "vocab_size": 32000})
    >>> p = predict(s, "a100", Workload(prompt_len=512, gen_len=128), weight_format="bf16")
    >>> round(p.decode_tok_s), p.bound("decode"), p.bound("prefill")
    (151, 'memory', 'compute')

Prefill is one forward over the prompt; decode is ``gen_len - 1`` forwards of one token each
(the first generated token comes out of prefill), each attending to a context one longer than
the last, so attention cost grows along the way. Operators are costed per step (the max of
compute and memory time is not linear) and summed.
"""

from __future__ import annotations

from typing import Any

from joules.errors import ConfigError
from joules.predict.calibrate import load_calibration
from joules.predict.catalog import DTYPE_BYTES, HardwareSpec, get_hardware
from joules.predict.result import Prediction
from joules.predict.roofline import (
    Coefficients,
    OpCost,
    Workload,
    attend_limit,
    op_cost,
    phase_ops,
)
from joules.predict.shape import ModelShape


def coefficients_for(hw: HardwareSpec) -> Coefficients:
    """Calibrated coefficients stored for ``hw`` (this machine), else datasheet defaults."""
    cal = load_calibration(hw.id)
    return cal.coefficients if cal is not None else Coefficients.uncalibrated(hw)


def _sum(costs: list[OpCost], phase: str) -> list[OpCost]:
    """Sum per-step costs by operator name; the bound is that of the summed times."""
    acc: dict[str, OpCost] = {}
    for c in costs:
        if c.name not in acc:
            acc[c.name] = OpCost(**{**c.to_dict(), "phase": phase})
            continue
        a = acc[c.name]
        for k in (
            "flops",
            "nbytes",
            "compute_s",
            "memory_s",
            "overhead_s",
            "dequant_s",
            "time_s",
            "energy_j",
        ):
            setattr(a, k, getattr(a, k) + getattr(c, k))
        a.bound = "compute" if a.compute_s >= a.memory_s else "memory"
    return list(acc.values())


def predict(
    shape: ModelShape,
    hardware: str | HardwareSpec,
    workload: Workload | None = None,
    *,
    weight_format: str | None = None,
    manifest: dict[str, Any] | None = None,
    head_format: str | None = None,
    coefficients: Coefficients | None = None,
    catalog_files: tuple[str, ...] = (),
) -> Prediction:
    """Predict latency, energy and memory of ``shape`` running ``workload`` on ``hardware``.

    ``weight_format``: a spec of ``joules.formats`` (``int4-g128``, ``mxfp4``...) or a dense
    dtype (``fp32``, ``bf16``, ``fp16``) for the decoder linears; default the compute dtype.
    ``manifest``: a compressed directory's ``joules.json`` (per-layer bytes and paths, KV
    policy), which overrides ``weight_format`` layer by layer. ``coefficients``: default the
    machine's stored calibration, else datasheet speed of light.
    """
    workload = workload or Workload()
    hw = hardware if isinstance(hardware, HardwareSpec) else get_hardware(hardware, catalog_files)
    coef = coefficients or coefficients_for(hw)
    dtype = workload.compute_dtype or hw.default_dtype
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"compute dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    fmt = weight_format or (manifest and "manifest") or dtype
    pre_ops, steps, plan, kv_b, policy = phase_ops(
        shape, workload, dtype, fmt if fmt != "manifest" else dtype, manifest, head_format
    )
    pre = [op_cost(o, "prefill", hw, coef) for o in pre_ops]
    dec = _sum([op_cost(o, "decode", hw, coef) for ops in steps for o in ops], "decode")
    b, p, g = workload.batch, workload.prompt_len, workload.gen_len
    prefill_s = sum(c.time_s for c in pre)
    decode_s = sum(c.time_s for c in dec)
    n_dec = g - 1
    tpot = decode_s / n_dec if n_dec else float("nan")
    e_pre = sum(c.energy_j for c in pre)
    e_dec = sum(c.energy_j for c in dec)
    # memory
    ctx = p + g
    a = DTYPE_BYTES[dtype]
    kv_bytes = 0.0
    for i in range(shape.n_layers):
        span = shape.sliding_window if shape.is_sliding(i) else None
        lim = attend_limit(policy, ctx)
        held = min(x for x in (ctx, span, lim) if x)
        kv_bytes += b * held * 2 * shape.kv_dim * kv_b
    d, f = shape.hidden, shape.intermediate
    act = b * p * (3 * d + shape.q_dim + 2 * shape.kv_dim + 2 * f) * a + b * shape.vocab * 4
    emulated = max(
        (w.emulated_elements for layer in plan.layers for w in layer.values()), default=0
    )
    act += emulated * a
    peak = plan.total_bytes + kv_bytes + act
    notes = []
    if not coef.calibrated:
        notes.append(
            "uncalibrated: datasheet peaks at 100 % efficiency (a speed of light; real runs are "
            "slower), energy from TDP and idle power"
        )
    method = "predicted"
    if coef.calibrated:
        notes += _calibration_notes(coef)
        if coef.degenerate:
            method = f"predicted (degenerate fit: {coef.degenerate_summary()})"
    if manifest:
        notes.append("weights per layer from the manifest (joules.json)")
    if policy:
        notes.append(f"KV cache policy {policy}")
    return Prediction(
        model=shape.name,
        hardware=hw.id,
        hardware_name=hw.name,
        weight_format="manifest" if fmt == "manifest" else fmt,
        compute_dtype=dtype,
        workload=workload.to_dict(),
        calibrated=coef.calibrated,
        coefficients_source=coef.source,
        prefill_s=prefill_s,
        decode_s=decode_s,
        tpot_s=tpot,
        prefill_tok_s=b * p / prefill_s,
        decode_tok_s=b / tpot if n_dec else float("nan"),
        prefill_energy_j=e_pre,
        decode_energy_j=e_dec,
        decode_j_per_token=e_dec / (b * n_dec) if n_dec else float("nan"),
        j_per_token=(e_pre + e_dec) / (b * g),
        weights_bytes=plan.total_bytes,
        kv_cache_bytes=kv_bytes,
        activation_bytes=act,
        peak_memory_bytes=peak,
        fits_in_memory=peak <= hw.memory_bytes,
        bits_per_weight=plan.bits_per_weight(),
        operators=pre + dec,
        band=dict(coef.band),
        energy_band=dict(coef.energy_band),
        notes=notes,
        method=method,
    )


def _calibration_notes(coef: Coefficients) -> list[str]:
    """What a calibrated prediction must say about its coefficients: a degenerate fit, and
    coefficients the calibration kept from the catalog."""
    notes = []
    if coef.degenerate:
        notes.append(
            f"degenerate fit: {coef.degenerate_summary()}; the bound, not the measured runs, set "
            "it, so this is a curve fitted through those runs, not a validated roofline"
        )
    if not coef.status:
        notes.append(
            "calibration stored before joules recorded which coefficients were fitted: re-run "
            "`joules predict calibrate` (its energy may be idle power only)"
        )
        return notes
    kept = [k for k, v in coef.status.items() if v == "catalog"]
    energy = ("static_w", "e_flop_j", "e_byte_j")
    if all(coef.status.get(k) == "catalog" for k in energy):
        notes.append(
            "energy from the catalog (idle power, TDP, datasheet peaks over the calibrated "
            "time): the calibration had no measured energy to fit"
        )
        kept = [k for k in kept if k not in (*energy, "max_power_w")]
    if kept:
        notes.append(f"kept from the catalog (no calibration run informs them): {', '.join(kept)}")
    return notes
