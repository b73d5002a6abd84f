"""Every meter test sees the same machine: no RAPL tree and an empty idle cache, whatever the
host has (a bare-metal node's real /sys/class/powercap or ~/.cache/joules/idle.json would
otherwise change which domains are detected and which baseline is subtracted). Tests that want
a powercap tree or a cache point these variables at their own."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_host(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_POWERCAP_ROOT", str(tmp_path / "no-powercap"))
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
