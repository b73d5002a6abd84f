"""The sweep's SQLite store: one row per run key, typed results as JSON, figures as columns.

    >>> from joules.sweep.store import Store
    >>> with Store(":memory:") as store:
    ...     store.schema_version()
    3

Durability: WAL journal, ``synchronous=FULL``, and one transaction per result (a run's start,
its finish or failure, one cache entry), so a process killed at any instant leaves every
finished run and cache entry intact and at most the run in progress marked ``running``, which
the next sweep re-does.

Schema (version 3; ``PRAGMA user_version`` holds the version, :data:`MIGRATIONS` upgrades an
older file in place and a newer file is refused):

``runs`` — one row per run key:
    key, model, recipe, workload ("p128/g32/b1/eager" or NULL for eval-only), config_json,
    versions_json, status ('running' | 'done' | 'failed'), error (one line), traceback, attempts,
    host, started_at / finished_at (ISO 8601 UTC), wall_s, timings_json ({phase: seconds});
    typed results as JSON: eval_json ({task: {result, window_nll, window_tokens, paired}}),
    bench_json (``BenchResult.to_dict()``, power timelines included), predictions_json
    ({hardware: ``Prediction.to_dict()``}), manifest_json (the compress manifest: recipe,
    bits_per_weight, model_bytes, layers...); and scalar columns copied from this machine's
    figures: ppl, ppl_lo, ppl_hi, ppl_increase_pct, ppl_increase_lo, ppl_increase_hi,
    bits_per_weight, model_bytes, j_per_token, j_per_token_lo, j_per_token_hi, energy_method,
    ttft_ms, tpot_ms, tpot_lo_ms, tpot_hi_ms, tokens_per_s, peak_rss_bytes; and, from version
    3, key_parts_json (what the key hashes: config, expanded recipe, model content, versions
    with the code fingerprint, compute identity; a later sweep diffs it to say why a run is
    stale), superseded_by (the key of the run that re-did this one under a newer key; analyses
    skip such rows) and stale_json (the reasons, when a sweep reused this run while stale).
``metrics`` — every figure of every run in long form: (run_key, name, hardware, value, lo, hi,
    unit, method); hardware '' is this machine (measured), else a predicted target; method is
    measured / estimated / predicted / emulated (or a combination such as 'estimated; emulated').
``cache`` — shared work: (kind, key, value_json, created_at); see ``joules.sweep.runner``.
``meta`` — (key, value): created_at, joules version that created the file.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joules import __version__
from joules.errors import ConfigError
from joules.serialize import to_jsonable

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE runs (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    recipe TEXT NOT NULL,
    workload TEXT,
    config_json TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    error TEXT,
    traceback TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    host TEXT,
    started_at TEXT,
    finished_at TEXT,
    wall_s REAL,
    timings_json TEXT,
    eval_json TEXT,
    bench_json TEXT,
    predictions_json TEXT,
    manifest_json TEXT
);
CREATE TABLE cache (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
"""

SCALARS = (
    ("ppl", "REAL"),
    ("ppl_lo", "REAL"),
    ("ppl_hi", "REAL"),
    ("ppl_increase_pct", "REAL"),
    ("ppl_increase_lo", "REAL"),
    ("ppl_increase_hi", "REAL"),
    ("bits_per_weight", "REAL"),
    ("model_bytes", "INTEGER"),
    ("j_per_token", "REAL"),
    ("j_per_token_lo", "REAL"),
    ("j_per_token_hi", "REAL"),
    ("energy_method", "TEXT"),
    ("ttft_ms", "REAL"),
    ("tpot_ms", "REAL"),
    ("tpot_lo_ms", "REAL"),
    ("tpot_hi_ms", "REAL"),
    ("tokens_per_s", "REAL"),
    ("peak_rss_bytes", "INTEGER"),
)


def _v2(conn: sqlite3.Connection) -> None:
    """Version 2: figures as columns on runs, and every figure in long form in ``metrics``."""
    for name, typ in SCALARS:
        conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {typ}")
    conn.execute(
        """CREATE TABLE metrics (
            run_key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
            name TEXT NOT NULL,
            hardware TEXT NOT NULL DEFAULT '',
            value REAL,
            lo REAL,
            hi REAL,
            unit TEXT,
            method TEXT NOT NULL,
            PRIMARY KEY (run_key, name, hardware)
        )"""
    )
    conn.execute("CREATE INDEX runs_status ON runs(status)")


# MIGRATIONS[i] takes a file at version i to version i + 1.
def _v1(conn: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would commit the migration's transaction.
    for stmt in _V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _v3(conn: sqlite3.Connection) -> None:
    """Version 3: a run's key components, the run that superseded it, why it was reused stale."""
    for name in ("key_parts_json", "superseded_by", "stale_json"):
        conn.execute(f"ALTER TABLE runs ADD COLUMN {name} TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1,
    _v2,
    _v3,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Columns of the scalar figures on `runs` that come from these metric names on this machine.
_SCALAR_FROM_METRIC = {
    "perplexity": ("ppl", "ppl_lo", "ppl_hi"),
    "ppl_increase_pct": ("ppl_increase_pct", "ppl_increase_lo", "ppl_increase_hi"),
    "bits_per_weight": ("bits_per_weight", None, None),
    "model_bytes": ("model_bytes", None, None),
    "j_per_token": ("j_per_token", "j_per_token_lo", "j_per_token_hi"),
    "ttft_ms": ("ttft_ms", None, None),
    "tpot_ms": ("tpot_ms", "tpot_lo_ms", "tpot_hi_ms"),
    "tokens_per_s": ("tokens_per_s", None, None),
    "peak_rss_bytes": ("peak_rss_bytes", None, None),
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _dumps(obj: Any) -> str | None:
    if obj is None:
        return None
    return json.dumps(to_jsonable(obj), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class Metric:
    """One figure: value, 95 % interval (or None), unit, method, and where (hardware '' = here)."""

    name: str
    value: float | None
    unit: str
    method: str
    lo: float | None = None
    hi: float | None = None
    hardware: str = ""


@dataclass
class RunRow:
    """A run as read back from the store (JSON columns decoded)."""

    key: str
    model: str
    recipe: str
    workload: str | None
    config: dict[str, Any]
    versions: dict[str, str]
    status: str
    error: str | None
    attempts: int
    wall_s: float | None
    timings: dict[str, float]
    eval: dict[str, Any] | None
    bench: dict[str, Any] | None
    predictions: dict[str, Any] | None
    manifest: dict[str, Any] | None
    metrics: list[Metric] = field(default_factory=list)
    key_parts: dict[str, Any] | None = None  # what the key hashes (None: stored before v3)
    superseded_by: str | None = None  # re-done under this key (code, versions... changed)
    stale: list[str] | None = None  # reused while stale (--reuse-stale): what had changed

    @property
    def synthetic(self) -> str | None:
        """The synthetic-weights label of the model this run measured (None: real weights)."""
        label = (self.manifest or {}).get("synthetic")
        return str(label) if label else None

    def metric(self, name: str, hardware: str = "") -> Metric | None:
        for m in self.metrics:
            if m.name == name and m.hardware == hardware:
                return m
        return None


class Store:
    """A sweep store file (created and migrated on open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise ConfigError(f"store {self.path!r}: directory {str(parent)!r} does not exist")
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path!r} is not a joules store ({exc})") from None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"store {self.path!r} has schema version {version}, newer than this joules "
                f"({SCHEMA_VERSION}): upgrade joules to read it"
            )
        for v in range(version, SCHEMA_VERSION):
            with self.transaction() as conn:
                MIGRATIONS[v](conn)
                conn.execute(f"PRAGMA user_version = {v + 1}")
                if v == 0:
                    conn.execute("INSERT INTO meta VALUES ('created_at', ?)", (_now(),))
                    conn.execute("INSERT INTO meta VALUES ('created_by', ?)", (__version__,))

    # -- runs ------------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        """{run key: status} of every run in the store."""
        return dict(self.conn.execute("SELECT key, status FROM runs"))

    def begin_run(
        self,
        key: str,
        model: str,
        recipe: str,
        workload: str | None,
        config: dict[str, Any],
        versions: dict[str, str],
        key_parts: dict[str, Any] | None = None,
    ) -> None:
        """Mark a run as running (a new row, or a failed/interrupted one being re-done)."""
        with self.transaction() as conn:
            conn.execute(
                """INSERT INTO runs (key, model, recipe, workload, config_json, versions_json,
                       key_parts_json, status, attempts, host, started_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 1, ?, ?)
                   ON CONFLICT(key) DO UPDATE SET status='running', error=NULL, traceback=NULL,
                       attempts=attempts + 1, host=excluded.host, started_at=excluded.started_at,
                       finished_at=NULL, superseded_by=NULL, stale_json=NULL,
                       key_parts_json=COALESCE(excluded.key_parts_json, key_parts_json)""",
                (key, model, recipe, workload, _dumps(config), _dumps(versions),
                 _dumps(key_parts), socket.gethostname(), _now()),
            )  # fmt: skip

    def key_records(self) -> list[dict[str, Any]]:
        """Every run's key, status, config, versions and key components (decoded), in insertion
        order: what a sweep needs to find stale runs without reading results."""
        cur = self.conn.execute(
            "SELECT key, status, config_json, versions_json, key_parts_json, superseded_by, "
            "stale_json FROM runs ORDER BY rowid"
        )
        return [
            {
                "key": k,
                "status": status,
                "config": json.loads(c) if c else None,
                "versions": json.loads(v) if v else {},
                "key_parts": json.loads(p) if p else None,
                "superseded_by": sup,
                "stale": json.loads(st) if st else None,
            }
            for k, status, c, v, p, sup, st in cur
        ]

    def supersede(self, keys: Sequence[str], by: str) -> None:
        """Mark runs ``keys`` as re-done under key ``by`` (analyses then read ``by`` instead)."""
        if not keys:
            return
        with self.transaction() as conn:
            conn.executemany("UPDATE runs SET superseded_by=? WHERE key=?", [(by, k) for k in keys])

    def mark_stale(self, key: str, reasons: Sequence[str]) -> None:
        """Record that run ``key`` was reused while stale, and why: it is the run analyses read
        again, even if an interrupted re-run had superseded it."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET stale_json=?, superseded_by=NULL WHERE key=?",
                (_dumps(list(reasons)), key),
            )

    def make_current(self, key: str) -> None:
        """Run ``key`` matches the current key again: neither stale nor superseded."""
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET stale_json=NULL, superseded_by=NULL WHERE key=?", (key,))

    def finish_run(
        self,
        key: str,
        *,
        wall_s: float,
        timings: dict[str, float],
        eval: dict[str, Any] | None,
        bench: dict[str, Any] | None,
        predictions: dict[str, Any] | None,
        manifest: dict[str, Any] | None,
        metrics: Sequence[Metric],
    ) -> None:
        """Store a finished run's results and figures in one transaction."""
        scalars: dict[str, Any] = {}
        for m in metrics:
            if m.hardware == "" and m.name in _SCALAR_FROM_METRIC:
                cols = _SCALAR_FROM_METRIC[m.name]
                for col, val in zip(cols, (m.value, m.lo, m.hi), strict=True):
                    if col:
                        scalars[col] = val
                if m.name == "j_per_token":
                    scalars["energy_method"] = m.method
        sets = ", ".join(f"{c} = ?" for c in scalars)
        with self.transaction() as conn:
            conn.execute(
                f"""UPDATE runs SET status='done', error=NULL, traceback=NULL, finished_at=?,
                       wall_s=?, timings_json=?, eval_json=?, bench_json=?, predictions_json=?,
                       manifest_json=?{", " + sets if sets else ""}
                   WHERE key=?""",
                (_now(), wall_s, _dumps(timings), _dumps(eval), _dumps(bench),
                 _dumps(predictions), _dumps(manifest), *scalars.values(), key),
            )  # fmt: skip
            conn.execute("DELETE FROM metrics WHERE run_key=?", (key,))
            conn.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (key, m.name, m.hardware, _finite(m.value), _finite(m.lo), _finite(m.hi),
                     m.unit, m.method)
                    for m in metrics
                ],
            )  # fmt: skip

    def fail_run(
        self,
        key: str,
        *,
        error: str,
        traceback: str | None,
        wall_s: float,
        timings: dict[str, float],
    ) -> None:
        """Store a failed run with its one-line error (re-tried only with --retry-failed)."""
        with self.transaction() as conn:
            conn.execute(
                """UPDATE runs SET status='failed', error=?, traceback=?, finished_at=?, wall_s=?,
                       timings_json=? WHERE key=?""",
                (error, traceback, _now(), wall_s, _dumps(timings), key),
            )

    def runs(self, status: str | None = None, *, include_superseded: bool = False) -> list[RunRow]:
        """Every current run (or those with ``status``), figures included, in insertion order.

        A run re-done under a newer key (other code, versions, model content...) is left out
        unless ``include_superseded``: its figures are not those of the code that runs now."""
        where = [] if include_superseded else ["superseded_by IS NULL"]
        if status:
            where.append("status=?")
        q = "SELECT * FROM runs"
        q += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY rowid"
        cur = self.conn.execute(q, (status,) if status else ())
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        metrics: dict[str, list[Metric]] = {}
        for r in self.conn.execute(
            "SELECT run_key, name, hardware, value, lo, hi, unit, method FROM metrics"
        ):
            metrics.setdefault(r[0], []).append(
                Metric(
                    name=r[1], hardware=r[2], value=r[3], lo=r[4], hi=r[5], unit=r[6], method=r[7]
                )
            )

        def load(s: str | None) -> Any:
            return json.loads(s) if s else None

        return [
            RunRow(
                key=r["key"],
                model=r["model"],
                recipe=r["recipe"],
                workload=r["workload"],
                config=load(r["config_json"]),
                versions=load(r["versions_json"]),
                status=r["status"],
                error=r["error"],
                attempts=r["attempts"],
                wall_s=r["wall_s"],
                timings=load(r["timings_json"]) or {},
                eval=load(r["eval_json"]),
                bench=load(r["bench_json"]),
                predictions=load(r["predictions_json"]),
                manifest=load(r["manifest_json"]),
                metrics=metrics.get(r["key"], []),
                key_parts=load(r["key_parts_json"]),
                superseded_by=r["superseded_by"],
                stale=load(r["stale_json"]),
            )
            for r in rows
        ]

    # -- shared-work cache -----------------------------------------------------------------
    def cache_get(self, kind: str, key: str) -> Any | None:
        row = self.conn.execute(
            "SELECT value_json FROM cache WHERE kind=? AND key=?", (kind, key)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def cache_put(self, kind: str, key: str, value: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?)",
                (kind, key, _dumps(value), _now()),
            )

    def cache_items(self, kind: str | None = None) -> dict[tuple[str, str], Any]:
        q = "SELECT kind, key, value_json FROM cache" + (" WHERE kind=?" if kind else "")
        return {
            (k, key): json.loads(v) for k, key, v in self.conn.execute(q, (kind,) if kind else ())
        }


def _finite(x: float | None) -> float | None:
    import math

    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(x)
