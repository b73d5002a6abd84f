"""`joules compress MODEL --target-size SIZE` then `joules export`: a GGUF file of at most SIZE
(and not smaller by more than the alignment slack plus the smallest single-tensor upgrade), that
llama.cpp loads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()
CANDS = "[gguf-q8_0, gguf-q5_0, gguf-q4_0]"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from joules.models import save_tiny_model

    d = tmp_path_factory.mktemp("ts")
    kw = dict(hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    return save_tiny_model(d / "t", "llama", seed=0, **kw)


@pytest.mark.parametrize("target", [900_000, 1_200_000])
def test_target_size_file_is_at_most_the_target(tiny, tmp_path, monkeypatch, target):
    from gguf import GGUFReader

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "c"
    r = runner.invoke(
        app,
        ["compress", str(tiny), "--target-size", f"{target}B", "-o", str(out), "--calib-n", "2",
         "--calib-len", "32", "-r", "awq(format=gguf-q4_0, grid=4)", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    man = json.loads(r.stdout)["manifest"]
    assert man["recipe"].startswith("awq(") and "gguf_mix(bytes=" in man["recipe"]
    plan = man["gguf_export"]["size_plan"]
    assert plan["target_bytes"] == target and plan["budget_bytes"] < target
    e = runner.invoke(app, ["export", str(out), "--to", "gguf", "-o", str(tmp_path / "f.gguf")])
    assert e.exit_code == 0, e.output
    size = (tmp_path / "f.gguf").stat().st_size
    n_tensors = len(GGUFReader(str(tmp_path / "f.gguf")).tensors)
    mix = man["gguf_export"]["mix"]
    # the smallest upgrade of one tensor by one type (q4_0 -> q5_0 of a 256-wide row: 4 B/32)
    step = 128 * 256 * 4 // 32
    slack = 32 * n_tensors + 4096  # alignment and metadata room (joules.deploy.size)
    assert target - (slack + step) <= size <= target, (size, mix)


def test_target_size_with_a_gguf_mix_of_chosen_candidates(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(
        app,
        ["compress", str(tiny), "-r", f"gguf_mix(bytes=800000, candidates={CANDS})", "-o",
         str(tmp_path / "m"), "--calib-n", "2", "--calib-len", "32", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    mix = json.loads(r.stdout)["manifest"]["gguf_export"]["mix"]
    assert mix["bytes"] <= 800000 and set(mix["types"]) <= {"gguf-q8_0", "gguf-q5_0", "gguf-q4_0"}


def test_bad_target_size_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["compress", str(tiny), "--target-size", "eighty", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "80MB" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(tiny), "--target-size", "300kB", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "the smallest GGUF file joules can write" in r.output
    r = runner.invoke(app, ["compress", str(tiny), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--target-size" in r.output
