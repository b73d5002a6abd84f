"""Run a benchmark: prefill and decode timed and metered apart, repeated, against the machine's
speed of light.

    >>> from joules.models import tiny_model
    >>> from joules.bench import BenchConfig, run_bench
    >>> model, tok, info = tiny_model("llama", seed=0)
    >>> cfg = BenchConfig(prompt_lens=(16,), gen_len=8, repeats=2, energy=False)
    >>> result = run_bench(model, tok, info, cfg, probe_if_missing=False)
    >>> row = result.rows[0]
    >>> row.prompt_len, row.batch, row.decode_tok_s > 0
    (16, 1, True)

One run = ``runtime.reset()``, then a meter window ``prefill`` around ``runtime.prefill`` (the
prompt and the first token: TTFT) and a window ``decode`` around the ``gen_len - 1`` decode steps
(each step timed: TPOT mean, p50, p90), both inside an outer window ``run``, so the phases can be
checked to add up to the whole. Timings use the meter's own clock (``time.monotonic`` for real
meters, a fake clock in tests), taken inside the windows, so the windows' reads are not timed.
Prompts are cut from the WikiText-2 test text at a seeded offset, one distinct slice per sequence
of the batch (all of the same length: no padding). A thread samples RSS during each run.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from joules.bench.config import BenchConfig
from joules.bench.memory import RssSampler
from joules.bench.probe import MachineLimits, _threads, load_machine_limits, probe_machine
from joules.bench.results import BenchResult, BenchRow, Interval, PhaseEnergy, percentile
from joules.bench.roofline import ModelCost
from joules.bench.runtimes import get_runtime
from joules.data import load_text
from joules.errors import ConfigError
from joules.measure import detect_meter
from joules.system import cpu_flags, system_info


def machine_record() -> dict[str, Any]:
    """Versions, CPU, memory, GPUs and CPU flags: what every bench result carries."""
    d = system_info().to_dict()
    d["cpu_flags"] = sorted(cpu_flags())  # sorted, as every committed bench result has them
    return d


def bench_prompts(tokenizer: Any, prompt_len: int, batch: int, seed: int = 0) -> torch.Tensor:
    """``batch`` distinct slices of ``prompt_len`` tokens of WikiText-2 test -> LongTensor [B, P]."""
    text = load_text("wikitext2", "test")
    need = prompt_len * batch
    offset = random.Random(seed).randrange(0, 1024)
    chars = (need + offset + 64) * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need + offset or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ConfigError(
            f"WikiText-2 test has {len(ids)} tokens, fewer than batch {batch} × prompt {prompt_len}"
        )
    offset = min(offset, len(ids) - need)
    flat = torch.tensor(ids[offset : offset + need], dtype=torch.long)
    return flat.view(batch, prompt_len)


def _activation_bytes(info: Any, batch: int, prompt_len: int, elt: int) -> float:
    """Rough peak working memory of a prefill beyond the weights and the KV cache."""
    per_token = 4 * info.hidden_size + 3 * info.intermediate_size
    scores = info.heads * prompt_len * prompt_len  # attention probabilities of one layer
    return batch * (prompt_len * per_token * elt + scores * 4 + info.vocab_size * 4)


def check_workload(info: Any, config: BenchConfig, available_bytes: int | None = None) -> None:
    """One-line ConfigError, before any work, for a workload this model or machine cannot run:
    bad values, a prompt + generation longer than the context, or a batch that does not fit in
    memory (estimated KV cache and activations against the memory available now)."""
    config.validate()
    ctx = int(info.max_position_embeddings or 0)
    for p in config.prompt_lens:
        if ctx and p + config.gen_len > ctx:
            raise ConfigError(
                f"prompt length {p} + {config.gen_len} generated tokens exceeds the model's "
                f"context of {ctx} positions: use a shorter --prompt-len or --gen-len"
            )
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    elt = 2 if config.dtype == "bf16" else 4
    for b in config.batch_sizes:
        for p in config.prompt_lens:
            kv = 2 * info.layers * info.kv_heads * info.head_dim * (p + config.gen_len) * b * elt
            need = kv + _activation_bytes(info, b, p, elt)
            if need > 0.8 * available_bytes:
                raise ConfigError(
                    f"batch {b} × prompt {p} needs about {need / 2**30:.1f} GiB beyond the "
                    f"weights but only {available_bytes / 2**30:.1f} GiB is available: "
                    f"use a smaller --batch or --prompt-len"
                )


def _phase(ms: list[Any], tokens: int) -> PhaseEnergy:
    """Aggregate one phase's measurements over the repeats."""
    energies = [m.energy_j for m in ms]
    med = statistics.median(energies)
    mid = min(ms, key=lambda m: abs(m.energy_j - med))
    last = ms[-1]
    return PhaseEnergy(
        energy_j=energies,
        tokens=tokens,
        method=mid.method,
        uncertainty_j=mid.uncertainty_j,
        duration_s=[m.duration_s for m in ms],
        methods={k: d.method for k, d in mid.domains.items()},
        domains_j={k: d.energy_j for k, d in mid.domains.items()},
        net_energy_j=mid.net_energy_j,
        timeline=last.timeline.to_dict() if last.timeline is not None else None,
    )


def _bench_row(
    runtime_cls: type,
    model: Any,
    ids: torch.Tensor,
    config: BenchConfig,
    meter: Any,
    clock: Callable[[], float],
    cost: ModelCost,
    model_bytes: int,
    tick: Callable[[], None],
    runtime_cache: dict | None,
) -> BenchRow:
    batch, prompt_len = ids.shape
    gen = config.gen_len
    key = (runtime_cls.name, id(model), batch, prompt_len + gen)
    rt = runtime_cache.get(key) if runtime_cache is not None else None
    if rt is None:
        rt = runtime_cls(model, batch=batch, max_len=prompt_len + gen)
        rt.prepare(ids)
        if runtime_cache is not None:
            runtime_cache[key] = rt
    for _ in range(config.warmup):
        rt.reset()
        rt.generate(ids, gen)
        tick()
    ttfts: list[float] = []
    tpots: list[float] = []
    steps_all: list[float] = []
    prefill_ms: list[Any] = []
    decode_ms: list[Any] = []
    run_j: list[float] = []
    peak_rss = 0
    tokens: list[int] = []
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    for _ in range(config.repeats):
        rt.reset()
        rt.sync()
        sampler = RssSampler().start()
        w_run = meter.begin("run") if meter else None
        w_pre = meter.begin("prefill", timeline=True) if meter else None
        t0 = clock()
        tok, state = rt.prefill(ids)
        rt.sync()
        t1 = clock()
        if meter:
            prefill_ms.append(meter.end(w_pre))
        w_dec = meter.begin("decode", timeline=True) if meter else None
        out = [tok]
        steps: list[float] = []
        t_prev = t_start = clock()
        for _ in range(gen - 1):
            tok, state = rt.decode_step(tok, state)
            rt.sync()
            t = clock()
            steps.append(t - t_prev)
            t_prev = t
            out.append(tok)
        if meter:
            decode_ms.append(meter.end(w_dec))
            run_j.append(meter.end(w_run).energy_j)
        peak_rss = max(peak_rss, sampler.stop())
        ttfts.append(t1 - t0)
        tpots.append((t_prev - t_start) / (gen - 1))
        steps_all.extend(steps)
        tokens = [int(t[0]) for t in out]
        tick()
    ttft = Interval.of(ttfts)
    tpot = Interval.of(tpots)
    row = BenchRow(
        prompt_len=prompt_len,
        batch=batch,
        gen_len=gen,
        repeats=config.repeats,
        ttft_s=ttft,
        tpot_s=tpot,
        tpot_mean_s=statistics.fmean(steps_all),
        tpot_p50_s=percentile(steps_all, 50),
        tpot_p90_s=percentile(steps_all, 90),
        prefill_tok_s=batch * prompt_len / ttft.median if ttft.median > 0 else float("inf"),
        decode_tok_s=batch / tpot.median if tpot.median > 0 else float("inf"),
        peak_rss_bytes=peak_rss,
        model_bytes=model_bytes,
        kv_bytes=int(cost.kv_bytes(batch, prompt_len + gen)),
        prefill_energy=_phase(prefill_ms, batch * prompt_len) if prefill_ms else None,
        decode_energy=_phase(decode_ms, batch * (gen - 1)) if decode_ms else None,
        run_energy_j=run_j,
        peak_cuda_bytes=int(torch.cuda.max_memory_allocated(rt.device)) if cuda else None,
        tokens=tokens,
    )
    row.notes = list(rt.notes)
    return row


def run_bench(
    model: Any,
    tokenizer: Any,
    info: Any,
    config: BenchConfig,
    meter: Any = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    limits: MachineLimits | None = None,
    probe_if_missing: bool = True,
    runtime_cache: dict | None = None,
) -> BenchResult:
    """Benchmark ``model`` on every prompt length × batch size of ``config``.

    ``meter`` None with ``config.energy`` builds :func:`joules.measure.detect_meter` (and closes
    it). ``limits`` None loads the cached probe for the thread count, probing now (≈ 15 s) if
    none is cached and ``probe_if_missing``; without limits the speed-of-light fields are None.
    ``progress(done, total)`` is called after every run (warm-ups included). ``config.dtype``
    other than "auto" casts the model in place. ``runtime_cache``: a dict the caller keeps to
    reuse prepared runtimes (compiled graphs) across calls on the same model.
    """
    check_workload(info, config)
    runtime_cls = get_runtime(config.runtime)
    # Before any work: a runtime refuses a model it cannot run (one line), casts a torch one.
    cost, mm_dtype = runtime_cls.model_facts(model, info, config.dtype)
    own_meter = False
    if meter is None and config.energy:
        meter, own_meter = detect_meter(), True
    if not config.energy:
        meter = None
    clock = meter.clock if meter is not None else time.perf_counter
    notes: list[str] = []
    total = len(config.prompt_lens) * len(config.batch_sizes) * (config.warmup + config.repeats)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    try:
        with _threads(config.threads) as n_threads:
            if limits is None:
                limits = load_machine_limits(n_threads)
                if limits is None and probe_if_missing:
                    limits = probe_machine(n_threads)
                    notes.append("machine limits probed at the start of this run")
            if limits is None:
                notes.append("no machine limits (run `joules bench --probe`): no speed of light")
            model_bytes = int(cost.model_bytes)  # as it is now (cast, compressed), not as loaded
            torch.manual_seed(config.seed)
            rows: list[BenchRow] = []
            for prompt_len in config.prompt_lens:
                for batch in config.batch_sizes:
                    ids = bench_prompts(tokenizer, prompt_len, batch, config.seed)
                    row = _bench_row(
                        runtime_cls,
                        model,
                        ids,
                        config,
                        meter,
                        clock,
                        cost,
                        model_bytes,
                        tick,
                        runtime_cache,
                    )
                    if limits is not None:
                        ctx = prompt_len + config.gen_len / 2
                        row.decode_sol_tok_s = cost.decode_sol_tok_s(
                            batch, ctx, limits.read_bw_bytes_s
                        )
                        row.decode_sol_fraction = row.decode_tok_s / row.decode_sol_tok_s
                        row.prefill_sol_tok_s = cost.prefill_sol_tok_s(
                            batch, prompt_len, limits.flops(mm_dtype)
                        )
                        row.prefill_sol_fraction = row.prefill_tok_s / row.prefill_sol_tok_s
                    rows.append(row)
                    notes.extend(n for n in row.notes if n not in notes)
    finally:
        if own_meter and meter is not None:
            meter.close()
    return BenchResult(
        model=str(info.spec),
        runtime=config.runtime,
        compute_dtype=mm_dtype,
        config=config.to_dict(),
        rows=rows,
        model_info=info.to_dict(),
        machine=machine_record(),
        limits=limits.to_dict() if limits is not None else None,
        cost=cost.to_dict(),
        linear_paths=runtime_cls.linear_paths(model),
        threads=n_threads,
        meter=meter.describe() if meter is not None else [],
        notes=notes + (list(meter.notes) if meter is not None else []),
    )


def quick_bench(
    model: Any, tokenizer: Any, info: Any, *, runtime: str = "eager", meter: Any = None
) -> BenchResult:
    """A short bench for ``joules demo``: one 128-token prompt, 32 tokens, 3 repeats."""
    cfg = BenchConfig(prompt_lens=(128,), gen_len=32, repeats=3, warmup=1, runtime=runtime)
    return run_bench(model, tokenizer, info, cfg, meter=meter)
