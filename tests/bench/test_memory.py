from __future__ import annotations

from joules.bench.memory import RssSampler


def test_peak_resets_between_spans():
    with RssSampler(interval_s=0.001) as s:
        buf = bytearray(64 << 20)
        buf[::4096] = b"x" * len(buf[::4096])  # touch every page
    big = s.peak_rss_bytes
    del buf
    with RssSampler(interval_s=0.001) as s2:
        pass
    assert big >= 64 << 20 and s.samples >= 2
    assert s2.peak_rss_bytes < big
