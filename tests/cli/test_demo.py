import json
from pathlib import Path

from typer.testing import CliRunner

from joules.cli import app
from joules.cli.demo import (
    DEMO_DEPLOY,
    demo_recipes,
    demo_spec,
    demo_toml,
    deploy_recipes,
    deploy_spec,
    deploy_toml,
)
from joules.compress import parse_recipe
from joules.sweep import parse_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_demo_spec_is_examples_demo_toml():
    # examples/demo.toml is the file people read and run; an installed joules has no examples/,
    # so the package ships a copy: edit examples/demo.toml and copy it over
    packaged = ROOT / "src" / "joules" / "data" / "demo.toml"
    assert packaged.read_text() == (ROOT / "examples" / "demo.toml").read_text(), (
        "copy examples/demo.toml to src/joules/data/demo.toml"
    )
    assert demo_toml() == packaged.read_text()


def test_the_packaged_deploy_spec_is_examples_deploy_toml():
    packaged = ROOT / "src" / "joules" / "data" / "deploy.toml"
    assert packaged.read_text() == (ROOT / "examples" / "deploy.toml").read_text(), (
        "copy examples/deploy.toml to src/joules/data/deploy.toml"
    )
    assert deploy_toml() == packaged.read_text()
    example = parse_spec((ROOT / "examples" / "deploy.toml").read_text(), "examples/deploy.toml")
    written = parse_spec(deploy_spec("smollm2-135m", 4096, 32, 32), "deploy_sweep.toml")
    # the demo's answer is examples/deploy.toml at its slice sizes, on a subset of its recipes
    assert set(written.recipes) <= set(example.recipes) and len(written.recipes) == 5
    assert written.eval == example.eval and written.deploy == example.deploy
    assert example.eval.runtime == "llamacpp" and example.bench[0].runtime == "llamacpp"
    assert any(r.startswith("llamacpp(") for r in example.recipes)  # the imatrix peer
    assert deploy_recipes() == list(DEMO_DEPLOY)  # each one is in examples/deploy.toml


def test_the_demo_with_its_default_flags_runs_examples_demo_toml():
    example = parse_spec((ROOT / "examples" / "demo.toml").read_text(), "examples/demo.toml")
    written = parse_spec(demo_spec("smollm2-135m", 2048, 16, 32), "demo_sweep.toml")
    assert written == example and written.runs() == example.runs()
    other = parse_spec(demo_spec("m", 300, 2, 4), check_models=False, check_recipes=False)
    assert other.models == ("m",) and other.eval.limit_tokens == 300
    assert other.calibration.n == 2 and [b.gen_len for b in other.bench] == [4]


def test_demo_spec_is_a_valid_sweep_of_every_landed_family():
    spec = parse_spec(demo_spec("smollm2-135m", 2048, 16, 32), "demo.toml")
    assert spec.recipes == tuple(parse_recipe(r).to_string() for r in demo_recipes())
    assert spec.recipes[0] == "baseline" and "gptq(format=int4-g64)" in spec.recipes
    assert any(r.startswith("prune(") for r in spec.recipes)
    assert spec.eval.limit_tokens == 2048 and spec.calibration.n == 16


def test_demo_on_a_tiny_model_runs_the_pipeline_and_reuses_its_store(
    tiny_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        "joules.cli.demo.demo_recipes",
        lambda: ["baseline", "rtn(format=int8-ch)", "gptq(format=int4-g32)"],
    )
    monkeypatch.setattr(
        "joules.cli.demo.deploy_recipes",
        lambda: ["baseline", "gptq(format=gguf-q4_0)", "llamacpp(ftype=Q4_0)"],
    )
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    # a random tiny model's KLD; 1,100 tokens make 3 windows of 512, so KLD has an interval
    monkeypatch.setattr("joules.cli.demo.DEMO_MAX_KLD", 100.0)
    monkeypatch.setattr("joules.cli.demo.SAME_SIZE", 10.0)  # its files' sizes differ widely
    args = ["demo", "--model", str(tiny_dir), "--new-tokens", "4", "--ppl-tokens", "1100"]
    args += ["--calib-n", "2", "--out", str(tmp_path / "o"), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    demo = d["demo"]
    assert demo["generation"]["new_tokens"] == 4 and demo["info"]["layers"] == 2
    energy = demo["generation_energy"]
    assert energy["energy_j"] > 0 and energy["method"] in ("counter", "sampled", "estimated")
    fmts = {f["format"]: f for f in demo["formats"]}
    assert fmts["int8-ch"]["sqnr_db"] > fmts["int4-g32"]["sqnr_db"] + 15
    assert [p["method"] for p in demo["predictions"]] == ["predicted", "predicted"]
    assert d["sweep"]["ran"] == 3 and d["sweep"]["failed"] == 0
    # the answer: a deployable GGUF file, measured on llama.cpp, beside the imatrix peer
    assert d["deploy_sweep"]["ran"] == 3 and d["deploy_sweep"]["failed"] == 0
    ship, peer = d["answer"]["ship"], d["answer"]["peer"]
    assert Path(ship["file"]).is_file() and ship["file"].endswith(".gguf")
    assert ship["kld_mean"]["value"] is not None and ship["tokens_per_s"]["value"] > 0
    assert peer["recipe"] == "llamacpp(ftype=Q4_0)"
    assert d["ship"]["chosen"]["recipe"] == ship["recipe"]
    assert (tmp_path / "o" / "demo.db").is_file() and (tmp_path / "o" / "demo_sweep.toml").is_file()
    report = tmp_path / "o" / "report.html"
    rendered_at = report.stat().st_mtime_ns
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["sweep"]["ran"] == 0 and again["sweep"]["skipped"] == 3
    assert again["deploy_sweep"]["ran"] == 0 and again["deploy_sweep"]["skipped"] == 3
    # the second run re-measures nothing: the quick look and the report are read back
    assert again["demo"]["measured_at"] == demo["measured_at"] is not None
    assert again["demo"]["generation"] == demo["generation"]
    assert report.stat().st_mtime_ns == rendered_at
    # other settings measure the quick look again
    r3 = runner.invoke(app, [*args[:4], "5", *args[5:]])
    assert r3.exit_code == 0, r3.output
    third = json.loads(r3.stdout)
    assert third["demo"]["generation"]["new_tokens"] == 5


def test_bad_model_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["demo", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "error:" in r.output and "no model at" in r.output
    assert "Traceback" not in r.output
