"""benchmarks/common.py, the one base of the benchmark scripts: its doctests, the row caches a
stopped run resumes from, and that the scripts take their shared flags from it."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# being rewritten elsewhere (issue 26): they still build their own parser
OWN_PARSER_OK = {"fresh_clone.py"}


@pytest.fixture(scope="module")
def common(bench_script: Any) -> Any:
    """``benchmarks/common.py`` loaded as the scripts import it (their folder on ``sys.path``)."""
    return bench_script("common")


def test_doctests(common):
    result = doctest.testmod(common, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_row_cache_keys_settings_and_inputs(common, tmp_path):
    a = common.RowCache("demo", {"model": "m", "length": 512}, root=tmp_path)
    a.put("row", {"ppl": 1.0}, {"bits": 4})
    b = common.RowCache("demo", {"model": "m", "length": 1024}, root=tmp_path)
    assert b.get("row", {"bits": 4}) is None  # other settings: measured again
    again = common.RowCache("demo", {"model": "m", "length": 512}, root=tmp_path)
    assert again.get("row", {"bits": 4}) == {"ppl": 1.0}  # a new run finds the kept row
    assert again.get("row", {"bits": 2}) is None and again.get("row") is None
    assert a.path("row", {"bits": 4}).parent == tmp_path / "bench-demo"


def test_resume_keeps_rows_only_under_the_same_settings(common, tmp_path):
    out = tmp_path / "r.json"
    common.write_json(out, {"settings": {"tokens": 1}, "rows": {"x": 1}, "families": {}})
    assert common.resume(out, {"tokens": 1}) == {
        "settings": {"tokens": 1},
        "rows": {"x": 1},
        "families": {},
    }
    assert common.resume(out, {"tokens": 2}) == {}
    assert common.resume(tmp_path / "none.json", {"tokens": 1}) == {}


def test_parser_flags_and_defaults(common):
    ap = common.parser(None, out=Path("o.json"), threads=1, calib_n=32, markdown=True)
    a = ap.parse_args([])
    assert (a.out, a.threads, a.calib_n, a.markdown) == (Path("o.json"), 1, 32, False)
    assert not hasattr(a, "model") and not hasattr(a, "force")
    assert ap.parse_args(["--calib-n", "8", "--markdown"]).calib_n == 8
    with pytest.raises(TypeError, match="no shared flag 'calib'"):
        common.parser(None, calib=1)


def test_scripts_take_their_shared_flags_from_common():
    """No script but the listed ones builds its own ``argparse.ArgumentParser``."""
    own = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        if path.name in OWN_PARSER_OK or path.name == "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            name = getattr(func, "attr", None) or getattr(func, "id", None)
            if name == "ArgumentParser":
                own.append(f"{path.name}:{node.lineno}")
    assert own == []


def test_figure_png_renders_a_plotly_figure(common, tmp_path, monkeypatch):
    import os
    import shutil

    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        png = common.figure_png(fig, tmp_path / "a" / "f.png", window=(400, 300))
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not os.environ.get("JOULES_REQUIRE_BROWSER"), "chromium is required here"
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    assert common.figure_png(fig, tmp_path / "g.png") is None  # no browser: no picture
    assert not (tmp_path / "g.png").exists()
