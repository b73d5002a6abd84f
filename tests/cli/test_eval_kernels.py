"""`joules compress` with AWQ then GPTQ, then `joules eval` says the linears ran on the kernel."""

from __future__ import annotations

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_awq_gptq_then_eval_runs_on_the_int4_kernel(tiny_dir, tmp_path, monkeypatch):
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
    assert "14 x kernel:cpu-int4/bf16" in " ".join(e.stdout.split())
