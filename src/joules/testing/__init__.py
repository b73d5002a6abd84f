"""Fakes for tests, benchmarks and screenshots: never used by joules itself.

- :mod:`joules.testing.measure`: a scripted energy backend and clock (``FakeBackend``,
  ``FakeClock``) and fake NVML / amdsmi libraries, so every meter path runs in CPU-only CI;
- :mod:`joules.testing.sweep`: ``FakeStages`` over a tiny random model, so every sweep path runs
  in seconds;
- :mod:`joules.testing.report`: ``write_fake_store``, a store of synthetic results for the
  report's tests and ``docs/screenshot.sh``.

They live in the package (not under ``tests/``) because scripts outside the test suite use them
too (``benchmarks/meter_overhead.py``, ``docs/screenshot.sh``). ``testing`` is the top layer of the
import-linter contract: it may import any part of joules, and no part of joules imports it.
"""
