"""What the energy meter costs: one window (µs) and the sampling thread's CPU share.

    $ python benchmarks/meter_overhead.py             # 10 s workload, 10 Hz sampling
    $ python benchmarks/meter_overhead.py --seconds 3 --interval 0.05 --out /tmp/overhead.json

1. Window cost: ``begin`` + ``end`` of an empty window, averaged over many windows, for the meter
   ``detect_meter()`` builds here and, as the peer measured in the same run, for a meter over
   the scripted fake backend (the machinery alone, no device reads).
2. Sampling thread: a pure-Python CPU workload runs for ``--seconds`` inside one window while
   the thread reads every backend at ``--interval``; the thread's own CPU time comes from
   /proc/self/task/TID/schedstat (nanoseconds), so the share is exact rather than inferred from noisy
   throughput. Goal: < 0.5 % of one core. Workload throughput with and without the meter is
   reported too, as a ratio (noisy on a shared machine: the GIL and other tenants).

Prints a table and writes JSON to benchmarks/results/meter_overhead.json (or --out): the command,
versions, machine (CPU model and ISA flags), load average, every figure, and ``readme_rows``,
the README's table (tests/test_readme_tables.py checks one against the other).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from common import header, parser, write_json
from joules.measure import Meter, detect_meter
from joules.testing.measure import FakeBackend


def window_cost_us(meter: Meter, n: int) -> list[float]:
    """Per-window cost (µs) of begin+end, in 5 batches of ``n`` after a warm-up batch."""
    for _ in range(max(n // 10, 10)):  # warm-up: imports, caches, the sampler thread start
        meter.end(meter.begin("w"))
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            meter.end(meter.begin("w"))
        batches.append((time.perf_counter() - t0) / n * 1e6)
    return batches


def _sleep(seconds: float) -> int:
    """An idle workload (the GIL is free: the thread's cost without contention)."""
    time.sleep(seconds)
    return 1


def _spin(seconds: float) -> int:
    """Pure-Python busy loop for ``seconds`` of wall time; returns iterations done (it holds the
    GIL, so the sampler must take it from this thread ten times a second: the worst case)."""
    it = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            it += 1
    return it


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds of one thread: schedstat (nanoseconds) where the kernel has it, else psutil
    (clock ticks, 10 ms resolution)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) * 1e-9
    except (OSError, ValueError, IndexError):
        pass
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return 0.0


def sampler_share(seconds: float, interval_s: float, spin: bool = True) -> dict[str, float]:
    work = _spin if spin else _sleep
    meter = detect_meter(interval_s=interval_s)
    # The peer: the same workload with no meter running, before and after (drift on a shared
    # machine averages out).
    before_it = work(seconds / 2)
    with meter.window("workload") as w:
        time.sleep(0.05)  # let the thread start
        thread = meter._thread
        assert thread is not None and thread.native_id is not None
        cpu0 = _thread_cpu_s(thread.native_id)
        t0 = time.perf_counter()
        metered_it = work(seconds)
        wall = time.perf_counter() - t0
        cpu1 = _thread_cpu_s(thread.native_id)
    baseline_it = before_it + work(seconds / 2)
    samples = len([s for s in meter._samples if s[0] >= w.start[next(iter(w.start))].t_s])
    meter.close()
    return {
        "workload": "python busy loop (holds the GIL)" if spin else "sleep (GIL free)",
        "seconds": wall,
        "interval_s": interval_s,
        "reads": samples,
        "thread_cpu_s": cpu1 - cpu0,
        "thread_cpu_share_pct": (cpu1 - cpu0) / wall * 100.0,
        "throughput_ratio": metered_it / baseline_it,
        "energy_j": w.measurement.energy_j if w.measurement else float("nan"),
        "method": w.measurement.method if w.measurement else "",
    }


def main() -> None:
    ap = parser(__doc__, out=Path("benchmarks/results/meter_overhead.json"))
    ap.add_argument("--seconds", type=float, default=10.0, help="workload length (s)")
    ap.add_argument("--interval", type=float, default=0.1, help="sampling period (s)")
    ap.add_argument("--windows", type=int, default=2000, help="windows per timing batch")
    args = ap.parse_args()

    meter = detect_meter()
    real = window_cost_us(meter, args.windows)
    backends = sorted({f"{d.backend}:{d.method}" for d in meter.domains()})
    meter.close()
    fake_meter = Meter([FakeBackend({"x": 1.0}, clock=time.monotonic)], idle_power_w=None)
    fake = window_cost_us(fake_meter, args.windows)
    fake_meter.close()
    share = sampler_share(args.seconds, args.interval, spin=True)
    idle_share = sampler_share(args.seconds, args.interval, spin=False)

    result = {
        **header("benchmarks/meter_overhead.py"),
        "meter_domains": backends,
        "window_cost_us": {"median": statistics.median(real), "batches": real},
        "fake_window_cost_us": {"median": statistics.median(fake), "batches": fake},
        "window_cost_ratio_vs_fake": statistics.median(real) / statistics.median(fake),
        "sampler": share,
        "sampler_idle_workload": idle_share,
        "goal_thread_cpu_share_pct": 0.5,
    }
    # The README's table, row by row (tests/test_readme_tables.py checks it against this file).
    result["readme_rows"] = [
        {
            "what": f"one window (begin+end), {', '.join(backends)}",
            "value": result["window_cost_us"]["median"],
        },
        {
            "what": "one window, fake backend (peer)",
            "value": result["fake_window_cost_us"]["median"],
        },
        {"what": "sampling thread, busy loop", "value": share["thread_cpu_share_pct"]},
        {"what": "sampling thread, sleep", "value": idle_share["thread_cpu_share_pct"]},
        {"what": "load average (1 min) at start", "value": result["load_avg_1m_at_start"]},
    ]
    t = Table(title="meter overhead", title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("meter domains", ", ".join(backends))
    t.add_row(
        "one window (begin+end), detected meter", f"{result['window_cost_us']['median']:.1f} µs"
    )
    t.add_row(
        "one window, fake backend (peer)", f"{result['fake_window_cost_us']['median']:.1f} µs"
    )
    t.add_row("ratio detected / fake", f"{result['window_cost_ratio_vs_fake']:.1f}x")
    for sh in (share, idle_share):
        t.add_row(
            f"sampling thread CPU over {sh['seconds']:.1f} s of {sh['workload']}",
            f"{sh['thread_cpu_s'] * 1e3:.1f} ms = {sh['thread_cpu_share_pct']:.3f} % of a core "
            f"({sh['reads']} reads at {1 / sh['interval_s']:.0f} Hz; goal < 0.5 %)",
        )
    t.add_row(
        "busy-loop throughput metered / unmetered (noisy)", f"{share['throughput_ratio']:.3f}"
    )
    Console().print(t)
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
