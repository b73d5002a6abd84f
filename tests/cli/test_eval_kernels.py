"""`joules compress` with AWQ then GPTQ, then `joules eval`: the int4 weights are decoded for quality work."""

from __future__ import annotations

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_awq_gptq_then_eval_decodes_the_int4_weights(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "bf16")
    out = tmp_path / "q"
    recipe = "awq(format=int4-g32, grid=4) | gptq(format=int4-g32)"
    args = ["compress", str(tiny_dir), "-r", recipe, "-o", str(out), "--calib-n", "4"]
    r = runner.invoke(app, [*args, "--calib-len", "32", "--json"])
    assert r.exit_code == 0, r.output
    e = runner.invoke(
        app,
        ["eval", str(out), "--task", "wikitext2", "--limit-tokens", "128", "--window", "64"],
    )
    assert e.exit_code == 0, e.output
    # evaluation decodes and multiplies densely, whatever kernel dtype is asked for speed work
    assert "14 x emulated" in " ".join(e.stdout.split())
