"""`joules compress`: a tiny model through the CLI, then `joules eval` on the output."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_compress_then_eval(tiny_dir, tmp_path):
    out = tmp_path / "q"
    args = ["compress", str(tiny_dir), "--recipe", "gptq(format=int4-g32)", "-o", str(out)]
    r = runner.invoke(app, [*args, "--calib-n", "4", "--calib-len", "32", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["manifest"]["bits_per_weight"] == 4.5
    assert d["manifest"]["calibration"]["split"] == "valid"
    assert (out / "joules.json").is_file() and (out / "model.safetensors").is_file()
    e = runner.invoke(
        app,
        [
            "eval",
            str(out),
            "--task",
            "wikitext2",
            "--limit-tokens",
            "128",
            "--window",
            "64",
            "--json",
        ],
    )
    assert e.exit_code == 0, e.output
    assert json.loads(e.stdout)["perplexity"] > 1
    table = runner.invoke(
        app, ["compress", str(tiny_dir), "-r", "rtn(format=int8-ch)", "-o", str(tmp_path / "t")]
    )
    assert table.exit_code == 0 and "bits/weight" in table.stdout


def test_bad_recipe_is_one_line_exit_2(tiny_dir, tmp_path):
    r = runner.invoke(
        app, ["compress", str(tiny_dir), "-r", "gptq(formt=int4)", "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 2
    assert "gptq has no key 'formt'" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(
        app,
        [
            "compress",
            str(tiny_dir),
            "-r",
            "rtn(format=int4-g32)",
            "-o",
            str(tmp_path / "x"),
            "--calib-len",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output  # rtn needs no calibration: --calib-len is unused
    r = runner.invoke(
        app,
        [
            "compress",
            str(tiny_dir),
            "-r",
            "gptq(format=int4-g32)",
            "-o",
            str(tmp_path / "y"),
            "--calib-len",
            "99999",
        ],
    )
    assert r.exit_code == 2 and "longer than the model's context" in r.output
    r = runner.invoke(
        app,
        ["compress", str(tmp_path / "nope"), "-r", "rtn(format=int8)", "-o", str(tmp_path / "z")],
    )
    assert r.exit_code == 2 and "no model at" in r.output


CALIB = ["--calib-n", "4", "--calib-len", "32"]


def test_mixed_family_is_one_command_with_members_in_manifest(tiny_dir, tmp_path):
    out = tmp_path / "fam"
    recipe = "mixed(avg_bits=[4, 6], candidates=[int3-g32, int4-g32, int8-g32])"
    r = runner.invoke(
        app,
        ["compress", str(tiny_dir), "-r", recipe, "-o", str(out), *CALIB, "--json"],
    )
    assert r.exit_code == 0, r.output
    fam = json.loads((out / "joules.json").read_text())["runtime"]["mixed_family"]
    assert [m["avg_bits"] for m in fam["members"]] == [4.0, 6.0]
    assert (out / "family.safetensors").is_file()
    bad = runner.invoke(
        app, ["compress", str(tiny_dir), "-r", "smoothquant(alpha=2)", "-o", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "[0, 1]" in bad.output
