import json

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_demo_on_a_tiny_model_prints_computed_figures(tiny_dir):
    r = runner.invoke(
        app,
        ["demo", "--model", str(tiny_dir), "--new-tokens", "6", "--ppl-tokens", "300", "--json"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["generation"]["new_tokens"] == 6
    assert d["generation"]["tokens_per_s"] > 0
    assert d["info"]["layers"] == 2
    energy = d["generation_energy"]
    assert energy["energy_j"] > 0 and energy["method"] in ("counter", "sampled", "estimated")
    assert energy["uncertainty_j"] > 0
    assert d["energy_j_per_token"] == energy["energy_j"] / 6
    fmts = {r["format"]: r for r in d["formats"]}
    assert set(fmts) == {"int8-ch", "mxfp8-e4m3", "uint4-asym-g32", "int4-g32", "mxfp4", "nxfp4"}
    # 8-bit formats keep far more signal than 4-bit ones on the same weights.
    assert fmts["int8-ch"]["sqnr_db"] > fmts["int4-g32"]["sqnr_db"] + 15
    ppl = d["perplexity"]
    assert [p["weights"] for p in ppl] == [
        "float32 as loaded",
        "uint4-asym-g32 (emulated)",
        "int4-g32 (emulated)",
        "mxfp4 (emulated)",
    ]
    assert all(p["tokens_scored"] > 200 and p["perplexity"] > 1 for p in ppl)
    assert d["perplexity_energy"]["energy_j"] > 0
    preds = d["predictions"]
    assert [p["hardware"] for p in preds] == ["this-machine", "nvidia-h100-sxm"]
    assert all(p["method"] == "predicted" for p in preds)
    assert preds[0]["workload"]["gen_len"] == 6


def test_bad_model_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["demo", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "error:" in r.output and "no model at" in r.output
    assert "Traceback" not in r.output
