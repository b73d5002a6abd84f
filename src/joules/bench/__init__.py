"""``joules bench``: latency, throughput, memory and joules per token, prefill and decode apart,
against this machine's speed of light.

    >>> from joules.models import tiny_model
    >>> from joules.bench import BenchConfig, run_bench
    >>> model, tok, info = tiny_model("llama", seed=0)
    >>> res = run_bench(model, tok, info, BenchConfig(prompt_lens=(16,), gen_len=4, repeats=2),
    ...                 probe_if_missing=False)
    >>> res.rows[0].decode_energy.method in ("counter", "sampled", "estimated")
    True

Modules: ``config.py`` (:class:`BenchConfig`), ``runtimes.py`` (eager / compiled behind one seam),
``llamacpp_runtime.py`` (a GGUF file run by llama.cpp, registered here),
``runner.py`` (:func:`run_bench`, :func:`quick_bench` for the demo), ``results.py``
(:class:`BenchResult`, :class:`BenchRow`), ``probe.py`` (``joules bench --probe``: bandwidth and
peak FLOP/s, cached), ``roofline.py`` (speed of light), ``memory.py`` (sampled peak RSS).
"""

from joules.bench import llamacpp_runtime  # noqa: F401  (registers the llamacpp runtime)
from joules.bench.config import BenchConfig
from joules.bench.probe import MachineLimits, load_machine_limits, probe_machine
from joules.bench.results import BenchResult, BenchRow, Interval, PhaseEnergy
from joules.bench.runner import check_workload, quick_bench, run_bench
from joules.bench.runtimes import Runtime, get_runtime, register_runtime, runtime_names

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BenchRow",
    "Interval",
    "MachineLimits",
    "PhaseEnergy",
    "Runtime",
    "check_workload",
    "get_runtime",
    "load_machine_limits",
    "probe_machine",
    "quick_bench",
    "register_runtime",
    "run_bench",
    "runtime_names",
]
