"""The Ray executor on a local Ray instance (ray.init(num_cpus=2)): runs, resumes, fails cleanly.

Ray is a dev/CI dependency (the `ray` extra, installed by `make install`): this test runs in CI,
it is not skipped.
"""

from __future__ import annotations

from collections import Counter

import pytest
import ray

from joules.sweep import Store, run_sweep
from joules.testing.sweep import FakeStages

VERSIONS = {"joules": "test", "torch": "test"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _log(path):
    return Counter(line.split(" ", 1)[1].strip() for line in path.read_text().splitlines())


def test_ray_sweep_resumes_and_stores_failures(local_ray, tmp_path, spec):
    db, log = tmp_path / "s.db", tmp_path / "calls.log"
    stages = FakeStages(log_path=str(log), fail_recipes=("round(bits=2)",)).stages()
    s1 = run_sweep(spec, db, executor="ray", stages=stages, versions=VERSIONS)
    assert (s1.total, s1.ran, s1.failed) == (4, 4, 1)
    calls = _log(log)
    # Baseline evaluated once on the cluster (first wave), then shipped to every run's task.
    assert calls["evaluate baseline wikitext2"] == 1
    assert calls["compress round(bits=8)"] == 1 and calls["bench round(bits=8) p16"] == 1
    with Store(db) as st:
        rows = {r.recipe: r for r in st.runs()}
        assert st.cache_items("eval")  # the driver wrote the workers' cache entries
    assert rows["round(bits=2)"].status == "failed"
    assert "fake failure compressing round(bits=2)" in rows["round(bits=2)"].error
    assert rows["round(bits=4)"].metric("ppl_increase_pct").method == "measured"
    assert rows["round(bits=4)"].metric("tpot_ms", "h100").method == "predicted"

    s2 = run_sweep(spec, db, executor="ray", stages=FakeStages(log_path=str(log)).stages(),
                   versions=VERSIONS)  # fmt: skip
    assert (s2.ran, s2.skipped, s2.failed_before) == (0, 3, 1)
    assert _log(log) == calls
    s3 = run_sweep(spec, db, executor="ray", stages=FakeStages(log_path=str(log)).stages(),
                   versions=VERSIONS, retry_failed=True)  # fmt: skip
    assert (s3.ran, s3.failed) == (1, 0)
    after = _log(log)
    assert after["compress round(bits=2)"] == 2 and after["evaluate baseline wikitext2"] == 1


def test_unreachable_address_is_a_one_line_error(tmp_path, spec):
    import socket

    from joules.errors import ConfigError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="cannot reach a Ray cluster"):
        run_sweep(spec, tmp_path / "s.db", executor="ray", address=f"127.0.0.1:{port}",
                  stages=FakeStages().stages(), versions=VERSIONS)  # fmt: skip
