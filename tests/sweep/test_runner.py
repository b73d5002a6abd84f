"""The runner on fake stages over a tiny model: resume, shared work, failures, kill -9."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from joules.sweep import Store, run_sweep
from joules.testing.sweep import FakeStages

VERSIONS = {"joules": "test", "torch": "test"}


def _log(path: Path) -> Counter:
    return Counter(line.split(" ", 1)[1].strip() for line in path.read_text().splitlines())


def test_sweep_then_second_run_redoes_nothing(tmp_path, spec):
    log = tmp_path / "calls.log"
    fake = FakeStages(log_path=str(log))
    db = tmp_path / "s.db"
    s1 = run_sweep(spec, db, stages=fake.stages(), versions=VERSIONS)
    assert (s1.total, s1.ran, s1.skipped, s1.failed) == (4, 4, 0, 0)
    calls = _log(log)
    # The baseline evaluation is computed once and shared by every compressed run's pairing.
    assert calls["evaluate baseline wikitext2"] == 1
    assert all(calls[f"compress round(bits={b})"] == 1 for b in (8, 4, 2))
    assert calls["load tiny"] == 1 and calls["calibration"] == 1
    s2 = run_sweep(spec, db, stages=fake.stages(), versions=VERSIONS)
    assert (s2.ran, s2.skipped) == (0, 4)
    assert _log(log) == calls  # nothing recomputed
    # New library versions: new keys, everything runs again.
    s3 = run_sweep(spec, db, stages=fake.stages(), versions={**VERSIONS, "torch": "next"})
    assert s3.ran == 4


def test_results_pair_with_the_baseline(tmp_path, spec):
    db = tmp_path / "s.db"
    run_sweep(spec, db, stages=FakeStages().stages(), versions=VERSIONS)
    with Store(db) as st:
        runs = {r.recipe: r for r in st.runs()}
    base = runs["baseline"].eval["wikitext2"]
    for recipe in ("round(bits=8)", "round(bits=4)", "round(bits=2)"):
        r = runs[recipe]
        ev = r.eval["wikitext2"]
        assert ev["window_tokens"] == base["window_tokens"]  # same protocol, same windows
        expect = math.expm1(ev["result"]["nll_mean"] - base["result"]["nll_mean"]) * 100
        m = r.metric("ppl_increase_pct")
        assert m.value == pytest.approx(expect, rel=1e-9, abs=1e-12)
        assert m.lo <= m.value <= m.hi and m.method == "measured"
        assert r.metric("tpot_ms", "h100").method == "predicted"
        assert r.metric("j_per_token").method == "estimated; emulated kernels"
        assert r.manifest["calibration"]["sha256"]
        # which path each layer's timed forwards took, per layer (the report's kernels column)
        assert set(r.manifest["layer_paths"]) == set(r.manifest["layers"])
        assert set(r.manifest["layer_paths"].values()) == {"emulated"}
        assert set(r.timings) >= {"compress", "eval wikitext2", "bench"}
    assert runs["baseline"].metric("ppl_increase_pct").value == 0.0
    assert (
        runs["round(bits=8)"].metric("model_bytes").value
        < runs["baseline"].metric("model_bytes").value
    )


def test_shared_work_across_workloads(tmp_path, make_spec, spec_text):
    text = spec_text.replace("prompt_len = [16]", "prompt_len = [16, 32]")
    log = tmp_path / "calls.log"
    s = run_sweep(
        make_spec(text), tmp_path / "s.db", stages=FakeStages(log_path=str(log)).stages(),
        versions=VERSIONS,
    )  # fmt: skip
    assert s.ran == 8
    calls = _log(log)
    # Two workloads per recipe: one compression and one evaluation each, two benches.
    assert calls["compress round(bits=4)"] == 1 and calls["evaluate round(bits=4) wikitext2"] == 1
    assert calls["bench round(bits=4) p16"] == 1 and calls["bench round(bits=4) p32"] == 1
    assert calls["evaluate baseline wikitext2"] == 1


def test_failed_runs_are_stored_and_retried_only_when_asked(tmp_path, spec):
    db = tmp_path / "s.db"
    failing = FakeStages(fail_recipes=("round(bits=4)",))
    s1 = run_sweep(spec, db, stages=failing.stages(), versions=VERSIONS)
    assert (s1.ran, s1.failed) == (4, 1)
    assert "compress: RuntimeError: fake failure compressing round(bits=4)" in s1.failures[0][1]
    with Store(db) as st:
        failed = st.runs("failed")
    assert len(failed) == 1 and failed[0].error.startswith("compress: RuntimeError")
    fixed = FakeStages()
    s2 = run_sweep(spec, db, stages=fixed.stages(), versions=VERSIONS)
    assert (s2.ran, s2.skipped, s2.failed_before) == (0, 3, 1) and fixed.calls == []
    s3 = run_sweep(spec, db, stages=fixed.stages(), versions=VERSIONS, retry_failed=True)
    assert (s3.ran, s3.failed, s3.skipped) == (1, 0, 3)
    assert "compress round(bits=4)" in fixed.calls
    with Store(db) as st:
        assert set(st.statuses().values()) == {"done"}


def test_a_missing_stage_fails_the_runs_that_need_it(tmp_path, spec):
    stages = FakeStages().stages()
    stages.bench = None
    stages.missing["bench"] = "joules.bench is not installed"
    s = run_sweep(spec, tmp_path / "s.db", stages=stages, versions=VERSIONS)
    assert s.failed == 4
    assert all(
        "stage 'bench' is not available: joules.bench is not installed" in e for _, e in s.failures
    )


def test_one_sweep_writes_a_store_at_a_time(tmp_path, spec):
    import fcntl

    from joules.errors import ConfigError

    db = tmp_path / "s.db"
    with open(f"{db}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another sweep is writing"):
            run_sweep(spec, db, stages=FakeStages().stages(), versions=VERSIONS)


_DRIVER = """
import sys
from joules.sweep import run_sweep
from joules.testing.sweep import FakeStages, fake_recipe
from joules.sweep.spec import parse_spec
spec = parse_spec(open(sys.argv[1]).read(), check_models=False, recipe_parser=fake_recipe,
                  hardware=["this-machine", "h100"])
run_sweep(spec, sys.argv[2], stages=FakeStages(log_path=sys.argv[3], sleep_s=1.0).stages(),
          versions={"joules": "test", "torch": "test"})
"""


def _done(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return {r[0] for r in conn.execute("SELECT recipe FROM runs WHERE status='done'")}
        finally:
            conn.close()
    except sqlite3.OperationalError:  # tables not created yet
        return set()


def test_kill_9_loses_nothing_finished_and_redoes_nothing_finished(tmp_path, spec_text, make_spec):
    spec_file, db, log = tmp_path / "s.toml", tmp_path / "s.db", tmp_path / "calls.log"
    spec_file.write_text(spec_text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(spec_file), str(db), str(log)], env=env
    )
    try:
        deadline = time.monotonic() + 240
        while len(_done(db)) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = _done(db)
    assert 2 <= len(done_at_kill) < 4, done_at_kill
    before = _log(log)

    s = run_sweep(
        make_spec(spec_text), db, stages=FakeStages(log_path=str(log)).stages(),
        versions={"joules": "test", "torch": "test"},
    )  # fmt: skip
    assert s.skipped == len(done_at_kill) and s.ran == 4 - len(done_at_kill) and s.failed == 0
    after = _log(log)
    for recipe in done_at_kill:  # finished before the kill: never benched again
        assert after[f"bench {recipe} p16"] == 1 == before[f"bench {recipe} p16"]
    # The baseline evaluation survived in the cache: not recomputed after the kill.
    assert after["evaluate baseline wikitext2"] == 1
    with Store(db) as st:
        assert st.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert sorted(st.statuses().values()) == ["done"] * 4
