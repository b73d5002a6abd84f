"""`joules sweep` after a joules source edit: stale runs are named with why, re-run or reused."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from joules import fingerprint
from joules.cli import app
from joules.sweep import Store

runner = CliRunner()


def test_a_source_edit_reruns_the_sweep_and_says_why(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    spec, store = tmp_path / "spec.toml", tmp_path / "s.db"
    spec.write_text(
        f'models = ["{tiny_dir}"]\nrecipes = ["baseline", "rtn(format=int8-ch)"]\n'
        "[eval]\nlimit_tokens = 256\nwindow = 64\n"
    )
    sweep = ["sweep", str(spec), "--store", str(store)]
    first = runner.invoke(app, [*sweep, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["ran"] == 2

    # Edit a function of (a copy of) the joules package: the fingerprint reads the copy.
    root = tmp_path / "joules"
    shutil.copytree(fingerprint.SOURCE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    src = root / "fingerprint.py"
    src.write_text(src.read_text().replace("n: int = 64", "n: int = 40", 1))
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", root)
    monkeypatch.setattr(fingerprint, "_FINGERPRINTS", {})

    reused = runner.invoke(app, [*sweep, "--reuse-stale"])
    assert reused.exit_code == 0, reused.output
    assert reused.stdout.count("stale, reused (--reuse-stale)") == 2
    assert "code: the joules source changed" in reused.stdout
    with Store(store) as st:
        assert all(r.stale and r.stale[0].startswith("code:") for r in st.runs())

    rerun = runner.invoke(app, [*sweep, "--json"])
    assert rerun.exit_code == 0, rerun.output
    s = json.loads(rerun.stdout)
    assert (s["ran"], s["skipped"], len(s["stale_rerun"])) == (2, 0, 2)
    assert all(
        reasons[0].startswith("code: the joules source changed") for _, reasons in s["stale_rerun"]
    )
    with Store(store) as st:
        runs = st.runs()
    assert len(runs) == 2 and all(r.stale is None for r in runs)
    assert {r.versions["joules_code"] for r in runs} == {fingerprint.code_fingerprint()[:16]}
    again = runner.invoke(app, [*sweep, "--json"])
    assert json.loads(again.stdout)["skipped"] == 2
