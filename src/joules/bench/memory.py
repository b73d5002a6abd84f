"""Peak resident memory of a span of code, sampled by a thread (``ru_maxrss`` never resets).

    >>> from joules.bench.memory import RssSampler
    >>> with RssSampler(interval_s=0.005) as s:
    ...     buf = bytearray(50_000_000)
    >>> s.peak_rss_bytes >= 50_000_000
    True

The sampler reads this process's RSS (psutil) when it starts, every ``interval_s`` seconds, and
when it stops; ``peak_rss_bytes`` is the highest value seen. A spike shorter than the interval
can be missed, so the figure is a lower bound of the true high-water mark. On CUDA the
allocator's own peak (``torch.cuda.max_memory_allocated``) is exact and is reported beside it.
"""

from __future__ import annotations

import threading
from typing import Any


class RssSampler:
    """High-water mark of this process's resident set size over a ``with`` block."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss_bytes = 0
        self.samples = 0

    def _read(self) -> None:
        rss = int(self._proc.memory_info().rss)
        self.samples += 1
        if rss > self.peak_rss_bytes:
            self.peak_rss_bytes = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def start(self) -> RssSampler:
        self.peak_rss_bytes, self.samples = 0, 0
        self._stop.clear()
        self._read()
        self._thread = threading.Thread(target=self._run, name="joules-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._read()
        return self.peak_rss_bytes

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
