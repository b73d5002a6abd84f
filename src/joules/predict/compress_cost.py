"""Time and peak memory of a compression, predicted before it starts from the model's shape and
a few seconds of this machine's own probe.

    >>> from joules.predict.compress_cost import UnitCosts, predict_compress
    >>> cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    ...        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    ...        "torch_dtype": "bfloat16"}
    >>> costs = UnitCosts(col_overhead_s=2e-5, col_s_per_row=1e-9, flops_1t={1024: 2e10},
    ...                   flops_mt={1024: 4e10}, factor_flops_1t={1024: 1e10},
    ...                   base_rss_bytes=300_000_000)
    >>> p = predict_compress(cfg, "gptq(format=int4-g32)", calib_n=8, calib_len=64, costs=costs)
    >>> p.method, p.time_s > 0, p.peak_rss_bytes > 300_000_000
    ('predicted', True, True)

The model (a sum of terms, each counted from the shapes; ``T`` = calibration tokens, ``n`` a
linear's input width, ``r`` its output rows):

* **forward**: every decoder block runs twice over the calibration tokens (capture its linears'
  inputs, then its compressed outputs for the next block): ``2 x 2 T x block parameters`` FLOPs
  plus attention's ``2 x 4 T L d`` at the multi-thread fp32 rate;
* **Hessians** (GPTQ, SparseGPT): ``2 T n^2`` per distinct input (q/k/v and gate/up share one)
  at the multi-thread rate;
* **factorisation**: one Cholesky and one triangular solve of each distinct Hessian, ``2 n^3 / 3``
  at the single-thread rate measured on a factorisation (GPTQ runs it on one thread);
* **column solve**: GPTQ visits every column once: per column a fixed cost (about ten small ops)
  plus a cost per output row (the rounding and the rank-1 update inside a 128-column block),
  both measured on the real solver, plus the block updates ``r n^2`` at the single-thread rate;
* **RTN**: one pass over the weights (counted at the column cost's per-element rate).

Peak memory, layer by layer: the process before it starts (``base_rss_bytes``: torch imported),
the input embedding as stored (the head stays in the checkpoint), one block in fp32 and its
compressed copy, the calibration hidden states entering and leaving the block (fp32), and the
widest Hessian's working set (its fp64 sum with an fp32 copy, then, the sum freed, at most three
fp32 matrices while it is factorised: 12 bytes per element), or the largest mini-batch activation
if larger. In memory: the whole model as loaded instead of the block and embedding.

Unit costs (:class:`UnitCosts`) come from :func:`measure_unit_costs` (about 3 s) and are cached
per CPU model and thread count in ``$JOULES_CACHE_DIR/compress_costs.json``. A probe beside
other jobs measures a slower machine: the prediction is then slower too (it records the load).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

from joules.compress.recipe import parse_recipe
from joules.compress.solvers.hessian import factorize, obs_solve
from joules.errors import ConfigError
from joules.paths import cache_dir
from joules.runtime_dtype import best_time_s, machine_load
from joules.serialize import atomic_write_json
from joules.system import cpu_model

CACHE_FILE = "compress_costs.json"
CACHE_VERSION = 1
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# steps with a cost model (others: no prediction, said so)
_SOLVE_STEPS = frozenset({"gptq"})
_CHEAP_STEPS = frozenset({"rtn"})


@dataclass(frozen=True)
class UnitCosts:
    """This machine's rates for the terms of :func:`predict_compress`."""

    col_overhead_s: float  # GPTQ column visit: fixed part
    col_s_per_row: float  # GPTQ column visit: per output row
    # FLOP/s by width n (a [2048, n] @ [n, n] matmul, or an n x n factorisation; between sizes log-log
    # interpolated, outside them the nearest): fp32 matmul on one thread (block updates), on
    # the run's threads (forward, Hessians), Cholesky + triangular solve on one thread
    flops_1t: dict[int, float]
    flops_mt: dict[int, float]
    factor_flops_1t: dict[int, float]
    base_rss_bytes: int  # this process with torch imported, before any model
    threads: int = 1
    cpu: str = ""
    load: dict[str, Any] | None = None

    def __post_init__(self) -> None:  # JSON keys are strings
        for name in ("flops_1t", "flops_mt", "factor_flops_1t"):
            object.__setattr__(
                self, name, {int(k): float(v) for k, v in getattr(self, name).items()}
            )


def rate(table: dict[int, float], n: float) -> float:
    """``table``'s rate at size ``n``: log-log interpolation, the nearest size outside.

    >>> round(rate({256: 1e9, 1024: 4e9}, 512))
    2000000000
    >>> rate({256: 1e9, 1024: 4e9}, 8192)
    4000000000.0
    """
    sizes = sorted(table)
    if n <= sizes[0]:
        return table[sizes[0]]
    if n >= sizes[-1]:
        return table[sizes[-1]]
    for a, b in itertools.pairwise(sizes):
        if a <= n <= b:
            f = math.log(n / a) / math.log(b / a)
            return float(math.exp(math.log(table[a]) + f * math.log(table[b] / table[a])))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CompressCost:
    """A predicted compression: wall time, peak RSS and the terms they add up from."""

    time_s: float
    peak_rss_bytes: int
    terms_s: dict[str, float]
    memory_bytes: dict[str, int]
    calib_tokens: int
    layered: bool
    method: str = "predicted"
    unmodelled_steps: list[str] = field(default_factory=list)
    costs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape(config: dict[str, Any]) -> dict[str, int]:
    try:
        d = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return {
            "d": d,
            "ff": int(config["intermediate_size"]),
            "layers": int(config["num_hidden_layers"]),
            "q": heads * int(config.get("head_dim") or d // heads),
            "kv": int(config.get("num_key_value_heads") or heads)
            * int(config.get("head_dim") or d // heads),
            "vocab": int(config["vocab_size"]),
            "tied": int(bool(config.get("tie_word_embeddings", False))),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"cannot predict the compression cost: the config has no {e} (a Llama-style "
            "decoder config is needed)"
        ) from None


def _linears(s: dict[str, int]) -> list[tuple[str, int, int, str]]:
    """(name, rows, cols, input group) of one decoder block's linears."""
    d, ff, q, kv = s["d"], s["ff"], s["q"], s["kv"]
    return [
        ("q_proj", q, d, "attn_in"),
        ("k_proj", kv, d, "attn_in"),
        ("v_proj", kv, d, "attn_in"),
        ("o_proj", d, q, "o_in"),
        ("gate_proj", ff, d, "mlp_in"),
        ("up_proj", ff, d, "mlp_in"),
        ("down_proj", d, ff, "down_in"),
    ]


def config_from_info(info: Any) -> dict[str, Any]:
    """The config.json keys :func:`predict_compress` reads, from a loaded model's
    :class:`~joules.models.info.ModelInfo`."""
    return {
        "hidden_size": info.hidden_size,
        "intermediate_size": info.intermediate_size,
        "num_hidden_layers": info.layers,
        "num_attention_heads": info.heads,
        "num_key_value_heads": info.kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": info.vocab_size,
        "tie_word_embeddings": info.tied_embeddings,
        "torch_dtype": info.dtype,
    }


def fitting_calibration(
    config: dict[str, Any], recipe: Any, calib_n: int, calib_len: int, available_bytes: int,
    layered: bool, costs: UnitCosts,
) -> int | None:  # fmt: skip
    """The largest ``calib_n`` (halving from ``calib_n``, at least 1) whose predicted peak fits
    ``available_bytes``, or None."""
    n = calib_n
    while n >= 1:
        p = predict_compress(config, recipe, calib_n=n, calib_len=calib_len, layered=layered,
                             costs=costs)  # fmt: skip
        if p.peak_rss_bytes <= available_bytes:
            return n
        n //= 2
    return None


def predict_compress(
    config: dict[str, Any],
    recipe: Any,
    *,
    calib_n: int,
    calib_len: int,
    layered: bool = True,
    costs: UnitCosts | None = None,
    batch_size: int = 8,
) -> CompressCost:
    """Predict the wall time and peak RSS of compressing a model of ``config`` (a config.json
    dict) with ``recipe`` on ``calib_n`` x ``calib_len`` calibration tokens."""
    costs = costs or load_unit_costs()
    s = _shape(config)
    steps = [st.name for st in parse_recipe(recipe).steps]
    tokens = calib_n * calib_len
    lin = _linears(s)
    block_params = sum(r * c for _, r, c, _ in lin)
    groups = {g: c for _, _, c, g in lin}  # distinct inputs: width
    calibrated = any(st in _SOLVE_STEPS for st in steps)
    terms: dict[str, float] = {}
    per_block: dict[str, float] = {}
    if calibrated:
        mt, one = costs.flops_mt, costs.flops_1t
        # two passes per block; attention's scores and weighted sum at the head width's rate
        per_block["forward"] = 2 * (
            sum(2 * tokens * r * c / rate(mt, min(r, c)) for _, r, c, _ in lin)
            + 4 * tokens * calib_len * s["d"] / rate(mt, calib_len)
        )
        per_block["hessians"] = sum(2 * tokens * n * n / rate(mt, n) for n in groups.values())
        per_block["factorise"] = sum(
            2 * n**3 / 3 / rate(costs.factor_flops_1t, n) for n in groups.values()
        )
        per_block["column_solve"] = sum(
            # block updates: [r, 128] @ [128, columns left]
            c * (costs.col_overhead_s + r * costs.col_s_per_row) + r * c * c / rate(one, 128)
            for _, r, c, _ in lin
        )
    if any(st in _CHEAP_STEPS for st in steps):
        per_block["rtn"] = block_params * costs.col_s_per_row * 4
    for k, v in per_block.items():
        terms[k] = v * s["layers"]
    unmodelled = [st for st in steps if st not in _SOLVE_STEPS | _CHEAP_STEPS]

    dtype_bytes = _DTYPE_BYTES.get(str(config.get("torch_dtype", "float32")), 4)
    embed = s["vocab"] * s["d"] * dtype_bytes  # the input embedding (the head stays on disk)
    mem: dict[str, int] = {"base": costs.base_rss_bytes}
    if layered:
        mem["embedding"] = embed
        mem["block_fp32"] = 2 * block_params * 4  # the block and its compressed copy
    else:
        mem["model"] = embed * (1 if s["tied"] else 2) + s["layers"] * block_params * dtype_bytes
        mem["block_fp32"] = block_params * 4
    if calibrated or "awq" in steps or "smoothquant" in steps:
        mem["calibration_states"] = 2 * tokens * s["d"] * 4
        widest = max(groups.values())
        batch = min(batch_size, calib_n) * calib_len
        mem["working"] = max(
            # the fp64 sum and its fp32 copy, then (the sum freed) at most three fp32 matrices
            widest * widest * 12 if calibrated else widest * widest * 8,
            batch * (2 * s["ff"] + s["d"]) * 4,
        )
    return CompressCost(
        time_s=sum(terms.values()),
        peak_rss_bytes=int(sum(mem.values())),
        terms_s=terms,
        memory_bytes=mem,
        calib_tokens=tokens,
        layered=layered,
        unmodelled_steps=unmodelled,
        costs=asdict(costs),
    )


def _round_int4(col: torch.Tensor, _j: int) -> torch.Tensor:
    scale = col.abs().amax().clamp(min=1e-8) / 7
    return (col / scale).round().clamp(-8, 7) * scale


def measure_unit_costs(threads: int | None = None) -> UnitCosts:
    """Measure the rates :func:`predict_compress` needs on this machine (about 3 s)."""
    threads = threads or torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    n = 512
    x = torch.randn(4 * n, n, generator=g)
    h = x.T @ x / x.shape[0]

    def solve(rows: int) -> float:
        w = torch.randn(rows, n, generator=g)
        f = factorize(h, 0.01, act_order=False)
        t = best_time_s(lambda: obs_solve(w, f, _round_int4, act_order=False), repeats=3)
        return (t - rows * n * n / rate(flops_1t, 128)) / n  # per column, block updates out

    def matmul_rates(sizes: tuple[int, ...]) -> dict[int, float]:
        # [2048, m] @ [m, m]: a mini-batch of tokens through an m-wide linear
        out = {}
        for m in sizes:
            x, w = torch.randn(2048, m, generator=g), torch.randn(m, m, generator=g)
            out[m] = 2 * 2048 * m * m / best_time_s(lambda x=x, w=w: x @ w, repeats=3)
        return out

    def factor_rate(m: int) -> float:
        b = torch.randn(m, m, generator=g)
        hb = b.T @ b / m + torch.eye(m)
        return (2 * m**3 / 3) / best_time_s(lambda: factorize(hb, 0.01, act_order=True), repeats=2)

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        flops_1t = matmul_rates((128, 1024))
        factor_1t = {m: factor_rate(m) for m in (512, 2048)}
        lo, hi = 256, 4096
        t_lo, t_hi = solve(lo), solve(hi)
        per_row = max((t_hi - t_lo) / (hi - lo), 0.0)
        overhead = max(t_lo - lo * per_row, 0.0)
        torch.set_num_threads(threads)
        flops_mt = matmul_rates((64, 256, 1024, 2048))
    finally:
        torch.set_num_threads(old)
    return UnitCosts(
        col_overhead_s=overhead,
        col_s_per_row=per_row,
        flops_1t=flops_1t,
        flops_mt=flops_mt,
        factor_flops_1t=factor_1t,
        base_rss_bytes=int(psutil.Process(os.getpid()).memory_info().rss),
        threads=threads,
        cpu=cpu_model(),
        load=machine_load().to_dict(),
    )


def load_unit_costs(threads: int | None = None, refresh: bool = False) -> UnitCosts:
    """This machine's cached :class:`UnitCosts` (measured and cached on first use)."""
    threads = threads or torch.get_num_threads()
    path = cache_dir() / CACHE_FILE
    key = f"{cpu_model()}|{threads}|torch {torch.__version__}"
    data: dict[str, Any] = {"version": CACHE_VERSION, "entries": {}}
    if path.exists():
        try:
            read = json.loads(path.read_text())
            if read.get("version") == CACHE_VERSION:
                data = read
        except (OSError, ValueError):
            pass
    entry = data["entries"].get(key)
    # a probe made beside other jobs is replaced by the first quiet one
    stale = bool(entry and (entry.get("load") or {}).get("busy") and not machine_load().busy)
    if entry and not refresh and not stale:
        return UnitCosts(**entry)
    costs = measure_unit_costs(threads)
    data["entries"][key] = asdict(costs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return costs
