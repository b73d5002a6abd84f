"""The store: WAL, one transaction per result, versioned schema with migrations."""

from __future__ import annotations

import sqlite3

import pytest

from joules.errors import ConfigError
from joules.sweep import store as store_mod
from joules.sweep.store import SCHEMA_VERSION, Metric, Store

CFG = {"model": "m", "recipe": "r"}
VERSIONS = {"joules": "0"}


def test_new_store_is_wal_and_current(tmp_path):
    with Store(tmp_path / "s.db") as st:
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st.schema_version() == SCHEMA_VERSION
        tables = {
            r[0] for r in st.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"runs", "metrics", "cache", "meta"} <= tables


def test_run_lifecycle_and_figures(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as st:
        st.begin_run("k1", "m", "r", "p16/g4/b1/eager", CFG, VERSIONS)
        assert st.statuses() == {"k1": "running"}
        metrics = [
            Metric("perplexity", 10.0, "", "measured", 9.0, 11.0),
            Metric("j_per_token", 0.5, "J/tok", "estimated", 0.4, 0.6),
            Metric("tpot_ms", 2.0, "ms", "predicted", hardware="h100"),
        ]
        st.finish_run(
            "k1", wall_s=1.0, timings={"eval": 0.5}, eval={"wikitext2": {"result": {}}},
            bench={"power_timeline": [[0, 1.5]]}, predictions={"h100": {"tpot_s": 0.002}},
            manifest={"model_bytes": 5}, metrics=metrics,
        )  # fmt: skip
        st.begin_run("k2", "m", "r2", None, CFG, VERSIONS)
        st.fail_run(
            "k2", error="compress: RuntimeError: boom", traceback="tb", wall_s=0.1, timings={}
        )
    # Re-opened by another connection: everything committed.
    with Store(path) as st:
        rows = {r.key: r for r in st.runs()}
        assert rows["k1"].status == "done" and rows["k2"].status == "failed"
        assert rows["k2"].error == "compress: RuntimeError: boom"
        assert rows["k1"].bench == {"power_timeline": [[0, 1.5]]}
        assert rows["k1"].metric("tpot_ms", "h100").method == "predicted"
        assert rows["k1"].metric("j_per_token").lo == 0.4
        ppl, jpt, method, tpot = st.conn.execute(
            "SELECT ppl, j_per_token, energy_method, tpot_ms FROM runs WHERE key='k1'"
        ).fetchone()
        # Scalar columns hold this machine's figures only (the h100 TPOT is a prediction).
        assert (ppl, jpt, method, tpot) == (10.0, 0.5, "estimated", None)
        # Re-doing a failed run counts an attempt and clears the error.
        st.begin_run("k2", "m", "r2", None, CFG, VERSIONS)
        (attempts, error) = st.conn.execute(
            "SELECT attempts, error FROM runs WHERE key='k2'"
        ).fetchone()
        assert (attempts, error) == (2, None)


def test_cache_roundtrip(tmp_path):
    with Store(tmp_path / "s.db") as st:
        assert st.cache_get("eval", "x") is None
        st.cache_put("eval", "x", {"window_nll": [1.0, 2.0]})
        assert st.cache_get("eval", "x") == {"window_nll": [1.0, 2.0]}
        assert st.cache_items("eval") == {("eval", "x"): {"window_nll": [1.0, 2.0]}}


def test_failed_write_rolls_back(tmp_path):
    with Store(tmp_path / "s.db") as st:
        st.begin_run("k", "m", "r", None, CFG, VERSIONS)
        bad = [Metric("a", 1.0, "", "measured"), Metric("a", 2.0, "", "measured")]  # same key
        with pytest.raises(sqlite3.IntegrityError):
            st.finish_run("k", wall_s=1, timings={}, eval=None, bench=None, predictions=None,
                          manifest=None, metrics=bad)  # fmt: skip
        assert st.statuses() == {"k": "running"}  # the whole result rolled back


def test_old_schema_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    store_mod.MIGRATIONS[0](conn)  # a file written by schema version 1
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO runs (key, model, recipe, config_json, versions_json, status) "
        "VALUES ('old', 'm', 'r', '{}', '{}', 'done')"
    )
    conn.execute("COMMIT")
    conn.close()
    with Store(path) as st:
        assert st.schema_version() == SCHEMA_VERSION
        assert st.statuses() == {"old": "done"}
        assert st.runs()[0].metrics == []


def test_newer_schema_and_non_store_are_refused(tmp_path):
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer than this joules"):
        Store(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="not a joules store"):
        Store(junk)
    with pytest.raises(ConfigError, match="does not exist"):
        Store(tmp_path / "no" / "dir.db")
