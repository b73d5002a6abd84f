"""Check joules on one NVIDIA GPU: the energy meter, the CUDA kernels, GPTQ and predict.

    python benchmarks/gpu_check.py                       # a GPU machine: ~7 of 8 minutes, H100
    python benchmarks/gpu_check.py --parts meter,decode  # some parts only
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json   # any CPU, ~30 s

Writes ``benchmarks/results/gpu_check.json``. The models are synthetic (random weights of real
shapes, :func:`joules.models.synthetic.write_synthetic`), so the script needs only joules and a
CUDA build of torch; they measure time, energy and memory, never quality. The time plan is
printed first; every part records its own seconds, and a part that fails records its error and
the others still run.

1. ``meter``: inside a steady bf16 matmul load, ``--windows`` windows of ``--window-s`` seconds
   (>= 30 s each): the NVML total-energy counter against NVML power sampled at 10 Hz and
   integrated by the trapezoid rule over the same windows (target: within 2 %).
2. ``async``: windows around a burst of queued matmuls (``--async-s`` seconds of GPU work),
   closed right after the launch without synchronising and with the meter's synchronisation:
   the unsynchronised window misses the work still queued (its error is reported).
3. ``gptq``: ``gptq(format=int4-g64)`` on the GPU: wall time, GPU energy and peak memory, on the
   1B shape (llama-3.2-1b) with ``--big-layers`` of its 16 decoder blocks.
4. ``decode``: the same shape on the compiled runtime (static KV cache, ``torch.compile``):
   decode tokens/s and J/token (GPU board energy, NVML counter) at batch 1 for dense fp16,
   ``int8-ch`` (``cuda-int8``), ``int4-g64`` (``cuda-int4``) and ``int4-g64`` emulated (the
   runtime decodes the weight once at load, as it does for a format without a kernel); the
   int4 rows are RTN (speed depends on the layout, not on how the values were chosen). Each
   quantized model's logits through the kernels are compared with the emulated path, and one
   layer's CUDA int4 output with the plain-torch reference of the kernel
   (:func:`joules.compress.modules.kernels.cuda_int4_reference`).
5. ``predict``: ``joules predict`` for this GPU (matched in ``data/hardware.json`` by name) and
   part 4's workloads beside the measured figures; then a leave-one-out calibration over a grid
   of >= 8 (prompt, generated, batch) points of the 135M shape (smollm2-135m, eager runtime: a
   grid on the compiled runtime would compile every shape), for decode latency and energy
   (targets: within 15 % and 20 %).

``--dry-run`` runs every part on the CPU at tiny sizes against a scripted fake NVML GPU
(:class:`joules.testing.measure.FakeNvml`) whose power follows the work: the code paths, not
the figures. Its JSON is marked ``"dry_run": true`` and only goes where ``--out`` says, never
to ``benchmarks/results``. Without a CUDA GPU and without ``--dry-run`` the script refuses.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, header, parser, write_json
from joules.measure.base import Meter
from joules.measure.carbon import match_device
from joules.measure.nvml import NvmlBackend
from joules.testing.measure import FakeGpu, FakeNvml

OUT = RESULTS / "gpu_check.json"
BUDGET_S = 480.0  # 8 minutes on an H100, every part included
PARTS = ("meter", "async", "gptq", "decode", "predict")
INT4 = "int4-g64"
INT8 = "int8-ch"
BIG = "llama-3.2-1b"
SMALL = "smollm2-135m"
TARGETS = {
    "meter_counter_vs_sampled_pct": 2.0,  # |sampled / counter - 1|, every window
    "int4_vs_emulated_x": 2.0,  # decode tok/s at batch 1, 1B shape
    "int4_vs_fp16_x": 1.5,
    "loo_decode_latency_pct": 15.0,  # mean |predicted / measured - 1|, leave-one-out
    "loo_decode_energy_pct": 20.0,
}
# (prompt_len, gen_len, batch) of the leave-one-out grid: prompts 64-1024, batch 1-16
GRID = (
    (64, 128, 1),
    (256, 128, 1),
    (1024, 128, 1),
    (128, 192, 2),
    (64, 128, 4),
    (512, 128, 4),
    (256, 128, 8),
    (64, 128, 16),
)
DRY_GRID = (
    (4, 3, 1),
    (8, 3, 1),
    (16, 3, 1),
    (4, 4, 2),
    (8, 3, 2),
    (4, 3, 3),
    (12, 3, 1),
    (4, 5, 1),
)


@dataclass(frozen=True)
class Settings:
    """Sizes of every part (a dry run shrinks them all)."""

    window_s: float = 30.0
    windows: int = 2
    warmup_s: float = 5.0
    async_s: float = 2.0
    async_repeats: int = 3
    big_layers: int = 8  # of llama-3.2-1b's 16: half the compile and write time of parts 3-4
    small_layers: int | None = None  # smollm2-135m: all 30
    calib_n: int = 32
    calib_len: int = 256
    prompt_len: int = 128
    gen_len: int = 256
    repeats: int = 3
    runtime: str = "compiled"
    grid: tuple[tuple[int, int, int], ...] = GRID
    grid_repeats: int = 2


DRY = Settings(
    window_s=0.6,
    windows=2,
    warmup_s=0.1,
    async_s=0.3,
    async_repeats=2,
    big_layers=1,
    small_layers=1,
    calib_n=2,
    calib_len=16,
    prompt_len=8,
    gen_len=4,
    repeats=1,
    runtime="eager",  # compiling on a CPU takes minutes
    grid=DRY_GRID,
    grid_repeats=1,
)


def plan(s: Settings, parts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Estimated seconds of each part on an H100 (guesses until a run replaces them: printed
    first, and the JSON keeps them beside the measured seconds)."""
    est = {
        "meter": (s.warmup_s + s.windows * s.window_s + 2, f"{s.windows} x {s.window_s:g} s"),
        "async": (s.async_repeats * 2 * (s.async_s + 0.5) + 3, f"2 x {s.async_repeats} bursts"),
        "gptq": (25 + 5 * s.big_layers, f"write + load the 1B shape, {s.big_layers} blocks"),
        "decode": (4 * (45 + s.repeats * 2) + 30, "3 models, 4 x (compile + bench)"),
        "predict": (10 + len(s.grid) * (s.grid_repeats + 1) * 1.5, f"{len(s.grid)} points"),
    }
    return {p: {"estimate_s": est[p][0], "what": est[p][1]} for p in parts}


# ----------------------------------------------------------------------------------------------
# The device under test: a CUDA GPU read through NVML, or the CPU with a scripted fake NVML GPU
# ----------------------------------------------------------------------------------------------

FAKE_IDLE_W, FAKE_BUSY_W = 70.0, 450.0
# a burst's products: 16384^2 (~9 TFLOP, ~12 ms on an H100), so 2 s is ~170 launches, well
# inside CUDA's launch queue (a full queue would block the launching call and hide the effect)
BURST_N = 16384


class Device:
    """Work and meters on the GPU under test. A dry run works on the CPU and drives a fake NVML
    GPU's power from that work (busy while it runs, idle after), so every meter path runs."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.type = "cpu" if dry_run else "cuda"
        self.fake = (
            FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", FAKE_IDLE_W)], clock=time.monotonic)
            if dry_run
            else None
        )
        self._burst: threading.Thread | None = None
        self._mm_s: float | None = None

    def name(self) -> str:
        return self.fake.gpus[0].name if self.fake else torch.cuda.get_device_name()

    def dtype(self, dtype: torch.dtype) -> torch.dtype:
        """A model's dtype here: as asked on a GPU; fp32 in a dry run (fp16 and bf16 matmuls
        are many times slower on a CPU without native support)."""
        return torch.float32 if self.fake else dtype

    def describe(self) -> dict[str, Any]:
        if self.fake:
            return {"name": self.name(), "fake": True, "capability": None}
        props = torch.cuda.get_device_properties(0)
        return {
            "name": self.name(),
            "capability": list(torch.cuda.get_device_capability()),
            "memory_bytes": int(props.total_memory),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }

    def meter(self, *, synchronize: bool = True, interval_s: float = 0.1) -> Meter:
        """A meter over this GPU alone (board energy; no CPU domain): closing it shuts its NVML
        handle, so each part takes its own."""
        backend = NvmlBackend(indices=[0], lib=self.fake)
        return Meter([backend], interval_s=interval_s, idle_power_w=None, synchronize=synchronize)

    def sync(self) -> None:
        if self.fake:
            if self._burst is not None:
                self._burst.join()
                self._burst = None
        else:
            torch.cuda.synchronize()

    def _set_power(self, watts: float) -> None:
        if self.fake:
            self.fake.set_power(0, watts)

    # -- loads -----------------------------------------------------------------------------
    def _operands(self, n: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Square bf16 operands (an 8192^2 product is ~1.1 TFLOP: compute-bound)."""
        n = 128 if self.fake else n
        dt = torch.float32 if self.fake else torch.bfloat16
        g = torch.Generator(device=self.type).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=self.type, dtype=dt)
        return a, torch.empty_like(a)

    def steady(self, seconds: float) -> int:
        """Matmuls back to back for ``seconds`` (synchronised every few, so the queue stays
        short and the load ends when the call does); returns how many ran. The fake GPU's
        power alternates between two levels every 0.25 s, so sampling has steps to follow."""
        a, c = self._operands()
        n = 0
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while time.perf_counter() < t_end:
            if self.fake:
                step = int((time.perf_counter() - t0) / 0.25) % 2
                self._set_power(FAKE_BUSY_W + (60.0 if step else -60.0))
            for _ in range(8):
                torch.mm(a, a, out=c)
            n += 8
            self.sync()
            if self.fake:
                time.sleep(0.005)
        self._set_power(FAKE_IDLE_W)
        return n

    def matmul_s(self) -> float:
        """Seconds of one product of :meth:`_operands` (measured once, synchronised)."""
        if self._mm_s is None:
            a, c = self._operands(BURST_N)
            for _ in range(3):
                torch.mm(a, a, out=c)
            self.sync()
            t0 = time.perf_counter()
            for _ in range(20):
                torch.mm(a, a, out=c)
            self.sync()
            self._mm_s = (time.perf_counter() - t0) / 20
        return self._mm_s

    def launch(self, seconds: float) -> int:
        """Queue about ``seconds`` of matmuls and return at once (the GPU works on after the
        call: CUDA launches are asynchronous). The fake runs them on a thread, busy power
        meanwhile. Returns how many products were queued."""
        count = max(1, round(seconds / self.matmul_s()))
        a, c = self._operands(BURST_N)
        if not self.fake:
            for _ in range(count):
                torch.mm(a, a, out=c)
            return count

        def work() -> None:
            self._set_power(FAKE_BUSY_W)
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                torch.mm(a, a, out=c)
            self._set_power(FAKE_IDLE_W)

        self._burst = threading.Thread(target=work, daemon=True)
        self._burst.start()
        return count

    def busy_while(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; the fake GPU draws busy power meanwhile (a real GPU draws what it draws)."""
        self._set_power(FAKE_BUSY_W)
        try:
            return fn()
        finally:
            self._set_power(FAKE_IDLE_W)


# ----------------------------------------------------------------------------------------------
# Part 1: NVML counter against sampled power, inside a steady load
# ----------------------------------------------------------------------------------------------


def part_meter(dev: Device, s: Settings, work: Path) -> dict[str, Any]:
    meter = dev.meter(interval_s=0.1)
    domain, key = "gpu0", "nvml0"  # the meter's first (only) backend
    try:
        dev.steady(s.warmup_s)  # NVML power is a 1 s moving average: let it settle
        rows = []
        for i in range(s.windows):
            w = meter.begin(f"steady {i}", timeline=True)
            products = dev.steady(s.window_s)
            m = meter.end(w)
            assert w.end is not None
            d = m.domains[domain]
            start, end = w.start[key].extra, w.end[key].extra
            sampled = end["sampled_j"][domain] - start["sampled_j"][domain]
            disc = end["disc_j"][domain] - start["disc_j"][domain]
            tl = m.timeline.power_w[domain] if m.timeline else []
            rows.append(
                {
                    "window_s": m.duration_s,
                    "counter_j": d.energy_j,
                    "method": d.method,
                    "sampled_j": sampled,
                    "sampled_vs_counter_pct": 100 * (sampled / d.energy_j - 1)
                    if d.energy_j > 0
                    else math.nan,
                    "trapezoid_bound_j": disc,
                    "avg_power_w": m.avg_power_w,
                    "samples": len(tl),
                    "power_w_min_max": [min(tl), max(tl)] if tl else None,
                    "matmuls": products,
                    "notes": m.notes,
                }
            )
    finally:
        meter.close()
    worst = max(abs(r["sampled_vs_counter_pct"]) for r in rows)
    return {
        "windows": rows,
        "max_abs_sampled_vs_counter_pct": worst,
        "all_counter": all(r["method"] == "counter" for r in rows),
        "load": "bf16 8192x8192 matmuls back to back" if not dev.fake else "fake: CPU matmuls",
    }


# ----------------------------------------------------------------------------------------------
# Part 2: windows around asynchronous kernels, with and without synchronisation
# ----------------------------------------------------------------------------------------------


def part_async(dev: Device, s: Settings, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"matmul_s": dev.matmul_s()}
    for synced in (False, True):
        meter = dev.meter(synchronize=synced)
        rows = []
        try:
            for _ in range(s.async_repeats):
                dev.sync()
                time.sleep(0.3)  # back to a steady idle between bursts
                t0 = time.perf_counter()
                w = meter.begin("burst")
                queued = dev.launch(s.async_s)
                if synced and dev.fake:
                    dev.sync()  # what the meter's synchronize_gpus does for CUDA
                m = meter.end(w)
                t_closed = time.perf_counter() - t0
                dev.sync()  # the work still queued finishes outside the window
                rows.append(
                    {
                        "window_s": m.duration_s,
                        "energy_j": m.energy_j,
                        "method": m.method,
                        "work_s": time.perf_counter() - t0,
                        "closed_after_s": t_closed,
                        "matmuls": queued,
                        "notes": m.notes,
                    }
                )
        finally:
            meter.close()
        out["synchronised" if synced else "unsynchronised"] = {
            "rows": rows,
            "median_energy_j": statistics.median(r["energy_j"] for r in rows),
            "median_window_s": statistics.median(r["window_s"] for r in rows),
        }
    sy, un = out["synchronised"], out["unsynchronised"]
    out["energy_error_unsynchronised_pct"] = 100 * (
        un["median_energy_j"] / sy["median_energy_j"] - 1
    )
    out["window_error_unsynchronised_pct"] = 100 * (
        un["median_window_s"] / sy["median_window_s"] - 1
    )
    return out


# ----------------------------------------------------------------------------------------------
# Models: synthetic checkpoints of the two shapes
# ----------------------------------------------------------------------------------------------


def checkpoint(shape: str, layers: int | None, work: Path) -> Path:
    """A synthetic checkpoint of ``shape`` (``layers`` decoder blocks, None: all) under
    ``work`` (written once per run)."""
    from joules.models.synthetic import write_synthetic

    out = work / f"{shape}-{layers or 'all'}"
    if not out.is_dir():
        write_synthetic(shape, out, layers=layers)
    return out


def big_shape(dev: Device) -> str:
    # a dry run stands the 135M shape in for the 1B one (its 128k-entry embedding alone is
    # 0.5 GB: minutes on a shared CPU)
    return SMALL if dev.fake else BIG


def _sync_time(dev: Device) -> float:
    dev.sync()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Part 3: GPTQ on the GPU
# ----------------------------------------------------------------------------------------------


def part_gptq(dev: Device, s: Settings, work: Path) -> dict[str, Any]:
    from joules.compress import calibration_tokens, compress, linear_paths
    from joules.compress.modules.linear import fallback_reasons, prepack
    from joules.models import load_model

    t0 = time.perf_counter()
    ckpt = checkpoint(big_shape(dev), s.big_layers, work)
    write_s = time.perf_counter() - t0
    lm = load_model(ckpt, dtype=dev.dtype(torch.bfloat16), device=dev.type)
    calib, info = calibration_tokens(lm.tokenizer, n=s.calib_n, length=s.calib_len)
    if not dev.fake:
        torch.cuda.reset_peak_memory_stats()
    meter = dev.meter()
    try:
        t1 = _sync_time(dev)
        with meter.window("gptq") as w:
            cm = dev.busy_while(
                lambda: compress(
                    lm.model, f"gptq(format={INT4})", calibration=calib, calibration_info=info
                )
            )
        gptq_s = _sync_time(dev) - t1
    finally:
        meter.close()
    m = w.measurement
    assert m is not None
    paths = prepack(lm.model, dev.dtype(torch.bfloat16))
    return {
        "shape": big_shape(dev),
        "layers": s.big_layers,
        "recipe": cm.manifest.recipe,
        "calibration": {"n": s.calib_n, "length": s.calib_len},
        "write_checkpoint_s": write_s,
        "gptq_s": gptq_s,
        "steps_s": {st["name"]: st["time_s"] for st in cm.manifest.steps},
        "gpu_energy_j": m.energy_j,
        "energy_method": m.method,
        "peak_cuda_bytes": None if dev.fake else int(torch.cuda.max_memory_allocated()),
        "layers_compressed": len(cm.manifest.layers),
        "linear_paths": paths or linear_paths(lm.model),
        "fallbacks": fallback_reasons(lm.model),
    }


# ----------------------------------------------------------------------------------------------
# Part 4: decode through the CUDA kernels on the compiled runtime
# ----------------------------------------------------------------------------------------------

# model -> (weight format or None for dense, model dtype, rows: name -> kernels on); the int4
# model is benched through its kernels, then emulated (one load and compression for both)
MODELS = {
    "fp16": (None, torch.float16, {"fp16": True}),
    "int8": (INT8, torch.bfloat16, {"int8": True}),
    "int4": (INT4, torch.bfloat16, {"int4": True, "int4-emulated": False}),
}


def _kernel_checks(model: Any, dev: Device, vocab: int) -> dict[str, Any]:
    """Logits through the kernels against the emulated path, and one int4 layer against the
    plain-torch reference of what tinygemm computes (the packing, checked on the device)."""
    from joules.compress import compressed_linears, set_kernels
    from joules.compress.modules import kernels as K

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, 32), generator=g).to(dev.type)
    with torch.no_grad():
        set_kernels(model, False)
        emulated = model(ids).logits.float()
        set_kernels(model, True)
        fast = model(ids).logits.float()
    out = {"logits_rel_err_vs_emulated": float((fast - emulated).norm() / emulated.norm())}
    layer = next(iter(compressed_linears(model).values()))
    q = layer.qtensor()
    if K.format_family(q) == "int4":
        x = torch.randn(4, layer.in_features, generator=g).to(dev.type, torch.bfloat16)
        with torch.no_grad():
            y = layer(x).float()
        ref = K.cuda_int4_reference(x, K.cuda_int4_operands(q)).float()
        out["layer"] = {"path": layer.path, "shape": list(q.shape)}
        out["layer"]["max_abs_err_vs_reference_rel"] = float(
            (y - ref).abs().max() / ref.abs().max()
        )
    return out


def part_decode(dev: Device, s: Settings, work: Path) -> dict[str, Any]:
    from joules.bench.config import BenchConfig
    from joules.bench.runner import run_bench
    from joules.compress import compress, set_kernels
    from joules.compress.modules.linear import fallback_reasons
    from joules.models import load_model

    ckpt = checkpoint(big_shape(dev), s.big_layers, work)
    cfg = BenchConfig(
        prompt_lens=(s.prompt_len,),
        gen_len=s.gen_len,
        batch_sizes=(1,),
        repeats=s.repeats,
        warmup=1,
        runtime=s.runtime,
    )
    rows: dict[str, Any] = {}
    for fmt, dtype, variants in MODELS.values():
        t0 = time.perf_counter()
        # compressed on the CPU (RTN: seconds), then moved
        lm = load_model(ckpt, dtype=dev.dtype(dtype))
        if fmt:
            compress(lm.model, f"rtn(format={fmt})")
        model = lm.model.to(dev.type)
        checks = _kernel_checks(model, dev, lm.info.vocab_size) if fmt else None
        for name, kernels in variants.items():
            set_kernels(model, kernels)
            meter = dev.meter()
            try:
                res = dev.busy_while(
                    lambda model=model, lm=lm, meter=meter: run_bench(
                        model, lm.tokenizer, lm.info, cfg, meter=meter, probe_if_missing=False
                    )
                )
            finally:
                meter.close()
            r = res.rows[0]
            dec = r.decode_energy
            rows[name] = {
                "format": fmt or "fp16",
                "model_dtype": str(dev.dtype(dtype)).removeprefix("torch."),
                "compute_dtype": res.compute_dtype,
                "linear_paths": res.linear_paths,
                "fallbacks": fallback_reasons(model),
                "decode_tok_s": r.decode_tok_s,
                "tpot_s": r.tpot_s.median,
                "ttft_s": r.ttft_s.median,
                "decode_j_per_token": r.decode_j_per_token,
                "decode_energy_method": dec.method if dec else None,
                "decode_energy_j": dec.median_j if dec else None,
                "peak_cuda_bytes": r.peak_cuda_bytes,
                "model_bytes": r.model_bytes,
                "kernel_checks": checks if kernels else None,
                "notes": res.notes,
                "wall_s": time.perf_counter() - t0,
            }
            t0 = time.perf_counter()
        del model, lm
        if not dev.fake:
            torch.cuda.empty_cache()
    tok = {k: v["decode_tok_s"] for k, v in rows.items()}
    return {
        "shape": big_shape(dev),
        "layers": s.big_layers,
        "runtime": s.runtime,
        "workload": {"prompt_len": s.prompt_len, "gen_len": s.gen_len, "batch": 1},
        "energy": "GPU board energy (NVML); the host CPU is not metered here",
        "rows": rows,
        "int4_vs_emulated_x": tok["int4"] / tok["int4-emulated"],
        "int4_vs_fp16_x": tok["int4"] / tok["fp16"],
        "int8_vs_fp16_x": tok["int8"] / tok["fp16"],
    }


# ----------------------------------------------------------------------------------------------
# Part 5: predict beside the measurements, and a leave-one-out calibration
# ----------------------------------------------------------------------------------------------


def hardware(dev: Device) -> Any:
    """The catalogued spec of this GPU (``data/hardware.json``, matched by its name)."""
    from joules.errors import ConfigError
    from joules.predict import get_hardware

    entry = match_device("gpu", dev.name())
    if entry is None:
        raise ConfigError(f"'{dev.name()}' is not in data/hardware.json: add it to predict it")
    return get_hardware(entry["id"])


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or not meas or math.isnan(pred):
        return None
    return pred / meas - 1


def predicted_rows(decode: dict[str, Any], hw: Any, ckpt: Path) -> list[dict[str, Any]]:
    """Uncalibrated predictions (datasheet peaks) of part 4's kernel rows (not the emulated
    one: predict models a kernel's bytes, not a dense copy made at load)."""
    from joules.predict import ModelShape, Workload, predict

    shape, _ = ModelShape.load(ckpt)
    wl = decode["workload"]
    out = []
    for name, r in decode["rows"].items():
        if name.endswith("emulated"):
            continue
        dtype = "fp16" if r["format"] == "fp16" else "bf16"
        p = predict(
            shape,
            hw,
            Workload(wl["prompt_len"], wl["gen_len"], wl["batch"], compute_dtype=dtype),
            weight_format=r["format"],
        )
        out.append(
            {
                "row": name,
                "method": p.method,
                "calibrated": p.calibrated,
                "predicted_tpot_s": p.tpot_s,
                "measured_tpot_s": r["tpot_s"],
                "tpot_rel_err": _rel(p.tpot_s, r["tpot_s"]),
                "predicted_decode_j_per_token": p.decode_j_per_token,
                "measured_decode_j_per_token": r["decode_j_per_token"],
                "j_per_token_rel_err": _rel(p.decode_j_per_token, r["decode_j_per_token"]),
                "bound": p.bound("decode"),
            }
        )
    return out


def loo(points: list[Any], hw: Any) -> dict[str, Any]:
    """Leave each point out, calibrate on the others, predict it: decode latency (time per
    decode step) and decode energy, relative errors."""
    from joules.predict import predict
    from joules.predict.calibrate import fit

    rows = []
    for i, o in enumerate(points):
        cal = fit([x for j, x in enumerate(points) if j != i], hw)
        p = predict(
            o.shape, hw, o.workload, weight_format=o.weight_format, coefficients=cal.coefficients
        )
        rows.append(
            {
                "point": o.label,
                "tpot_s": o.tpot_s,
                "pred_tpot_s": p.tpot_s,
                "tpot_rel_err": _rel(p.tpot_s, o.tpot_s),
                "decode_energy_j": o.decode_energy_j,
                "pred_decode_energy_j": p.decode_energy_j if cal.n_energy_runs else None,
                "energy_rel_err": _rel(p.decode_energy_j, o.decode_energy_j)
                if cal.n_energy_runs
                else None,
                "energy_method": o.energy_method,
                "fit_degenerate": cal.coefficients.degenerate_summary() or None,
            }
        )

    def mape(key: str) -> float | None:
        errs = [abs(r[key]) for r in rows if r[key] is not None]
        return 100 * statistics.fmean(errs) if errs else None

    return {
        "points": rows,
        "n_points": len(rows),
        "loo_decode_latency_mape_pct": mape("tpot_rel_err"),
        "loo_decode_energy_mape_pct": mape("energy_rel_err"),
    }


def part_predict(
    dev: Device, s: Settings, work: Path, decode: dict[str, Any] | None
) -> dict[str, Any]:
    from joules.bench.config import BenchConfig
    from joules.bench.runner import run_bench
    from joules.models import load_model
    from joules.predict import ModelShape
    from joules.predict.calibrate import observations_from_bench

    hw = hardware(dev)
    out: dict[str, Any] = {"hardware": hw.id, "hardware_name": hw.name}
    if decode and "rows" in decode:
        out["decode_rows"] = predicted_rows(
            decode, hw, checkpoint(big_shape(dev), s.big_layers, work)
        )
    ckpt = checkpoint(SMALL, s.small_layers, work)
    shape, _ = ModelShape.load(ckpt)
    lm = load_model(ckpt, dtype=dev.dtype(torch.bfloat16), device=dev.type)  # dense
    points = []
    meter = dev.meter()
    try:
        for p, g, b in s.grid:
            cfg = BenchConfig(
                prompt_lens=(p,),
                gen_len=g,
                batch_sizes=(b,),
                repeats=s.grid_repeats,
                warmup=1,
                runtime="eager",
            )
            res = dev.busy_while(
                lambda cfg=cfg: run_bench(
                    lm.model, lm.tokenizer, lm.info, cfg, meter=meter, probe_if_missing=False
                )
            )
            fmt = res.compute_dtype  # bf16 (fp32 in a dry run)
            obs, _ = observations_from_bench(res.to_dict(), shape, weight_format=fmt)
            points += obs
    finally:
        meter.close()
    out["grid"] = {
        "shape": SMALL,
        "layers": s.small_layers or shape.n_layers,
        "runtime": "eager",
        "format": points[0].weight_format,
        **loo(points, hw),
    }
    return out


# ----------------------------------------------------------------------------------------------
# Running, the summary table, the JSON
# ----------------------------------------------------------------------------------------------


def verdicts(parts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target against its figure (None where the part did not run or failed)."""

    def get(part: str, *keys: str) -> float | None:
        v: Any = parts.get(part)
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v if isinstance(v, int | float) else None

    figures = {
        "meter_counter_vs_sampled_pct": (get("meter", "max_abs_sampled_vs_counter_pct"), "<="),
        "int4_vs_emulated_x": (get("decode", "int4_vs_emulated_x"), ">="),
        "int4_vs_fp16_x": (get("decode", "int4_vs_fp16_x"), ">="),
        "loo_decode_latency_pct": (get("predict", "grid", "loo_decode_latency_mape_pct"), "<="),
        "loo_decode_energy_pct": (get("predict", "grid", "loo_decode_energy_mape_pct"), "<="),
    }
    out = {}
    for name, (value, op) in figures.items():
        target = TARGETS[name]
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": value, "target": f"{op} {target:g}", "met": met}
    return out


def table(data: dict[str, Any]) -> str:
    lines = [
        f"{'target':32s} {'figure':>10s} {'goal':>8s}  met",
        *(
            f"{k:32s} {'-' if v['value'] is None else format(v['value'], '10.3g'):>10s} "
            f"{v['target']:>8s}  {'-' if v['met'] is None else 'yes' if v['met'] else 'NO'}"
            for k, v in data["verdicts"].items()
        ),
        "",
        f"{'part':10s} {'status':>7s} {'plan s':>8s} {'took s':>8s}",
        *(
            f"{p:10s} {r['status']:>7s} {data['plan'][p]['estimate_s']:8.0f} {r['seconds']:8.1f}"
            + (f"  {r['error']}" if r.get("error") else "")
            for p, r in data["parts"].items()
        ),
    ]
    return "\n".join(lines)


def refuse(msg: str) -> int:
    print(f"gpu_check: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out=OUT)
    ap.add_argument("--dry-run", action="store_true", help="CPU, fake NVML, tiny sizes")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    ap.add_argument("--window-s", type=float, help="seconds per meter window (>= 30 on a GPU)")
    ap.add_argument("--windows", type=int, help="meter windows")
    ap.add_argument("--big-layers", type=int, help="decoder blocks of the 1B shape (of 16)")
    ap.add_argument("--work", type=Path, help="where synthetic checkpoints go (default: temp)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="skip a part when less than half its planned time is left of this many seconds "
        "(default: %(default)s)",
    )
    args = ap.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        return refuse(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    if args.dry_run and args.out.resolve() == OUT.resolve():
        return refuse("a dry run is no result: pass --out PATH outside benchmarks/results")
    if not args.dry_run and not torch.cuda.is_available():
        return refuse(
            "no CUDA GPU here (torch.cuda.is_available() is False): run it on an NVIDIA GPU "
            "machine, or pass --dry-run --out PATH to exercise it on the CPU"
        )
    s = DRY if args.dry_run else Settings()
    s = replace(
        s,
        **{
            k: v
            for k, v in (
                ("window_s", args.window_s),
                ("windows", args.windows),
                ("big_layers", args.big_layers),
            )
            if v is not None
        },
    )
    if not args.dry_run and s.window_s < 30:
        return refuse(f"--window-s {s.window_s:g}: the meter check needs windows of >= 30 s")
    if args.dry_run:
        torch.set_num_threads(2)  # a dry run shares a small CPU
        os.environ["JOULES_KERNEL_DTYPE"] = "fp32"  # no CPU speed probe: fp32 throughout
    dev = Device(args.dry_run)
    try:
        NvmlBackend(indices=[0], lib=dev.fake).close()
    except Exception as exc:  # no driver, no pynvml: one line, no traceback
        return refuse(f"NVML unavailable ({exc}): the meter parts need nvidia-ml-py and a driver")

    the_plan = plan(s, parts)
    print(f"time plan ({'dry run: CPU, fake NVML' if args.dry_run else dev.name()}; "
          f"estimates for an H100, budget {args.budget_s:.0f} s):")  # fmt: skip
    for p, e in the_plan.items():
        print(f"  {p:8s} {e['estimate_s']:6.0f} s  {e['what']}")
    print(f"  {'total':8s} {sum(e['estimate_s'] for e in the_plan.values()):6.0f} s", flush=True)

    data: dict[str, Any] = {
        **header("benchmarks/gpu_check.py", argv),
        "dry_run": args.dry_run,
        "device": dev.describe(),
        "settings": asdict(s),
        "plan": the_plan,
        "budget_s": args.budget_s,
        "targets": TARGETS,
        "synthetic": "random weights of real shapes: time, energy and memory only",
        "parts": {},
    }
    run = {
        "meter": part_meter,
        "async": part_async,
        "gptq": part_gptq,
        "decode": part_decode,
        "predict": lambda d, st, w: part_predict(d, st, w, data["parts"].get("decode")),
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for p in parts:
            spent = time.perf_counter() - t_all
            if spent + 0.5 * the_plan[p]["estimate_s"] > args.budget_s:
                data["parts"][p] = {"status": "skipped", "seconds": 0.0,
                                    "error": f"over budget: {spent:.0f} s of {args.budget_s:.0f} "
                                    f"spent, ~{the_plan[p]['estimate_s']:.0f} s planned"}  # fmt: skip
                print(f"[{p}] skipped: {data['parts'][p]['error']}", flush=True)
                continue
            print(f"[{p}] ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **run[p](dev, s, work)}
            except Exception as exc:
                dev.sync()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                result = {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {first}"[:300],
                    "traceback": traceback.format_exc()[-4000:],
                }
            result["seconds"] = time.perf_counter() - t0
            data["parts"][p] = result
            print(f"[{p}] {result['status']} in {result['seconds']:.1f} s", flush=True)
    data["total_s"] = time.perf_counter() - t_all
    data["verdicts"] = verdicts(data["parts"])
    write_json(args.out, data, indent=1)
    print()
    print(table(data))
    print(f"\ntotal {data['total_s']:.0f} s (budget {args.budget_s:.0f} s); wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in data["parts"].values()) else 1  # see the table


if __name__ == "__main__":
    sys.exit(main())
