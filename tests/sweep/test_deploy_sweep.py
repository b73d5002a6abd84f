"""The sweep on the deployed runtime: each run exports its GGUF file, evaluates and benches that
file through llama.cpp, the store records the file, and `joules recommend --export` ships it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from joules.errors import ConfigError
from joules.fingerprint import file_sha256
from joules.sweep.spec import parse_spec

pytest.importorskip("llama_cpp")

DEPLOY = """\
models = ["{model}"]
recipes = {recipes}

[eval]
tasks = {tasks}
limit_tokens = 256
window = 64
runtime = "llamacpp"

[calibration]
n = 4
length = 64

[bench]
prompt_len = [8]
gen_len = 3
repeats = 1
warmup = 0
runtime = "llamacpp"
"""


def _spec(model="m", recipes='["baseline"]', tasks='["wikitext2"]', extra="", **kw):
    text = DEPLOY.format(model=model, recipes=recipes, tasks=tasks) + extra
    return parse_spec(text, "deploy.toml", check_models=False, **kw)


def test_a_recipe_without_a_gguf_form_is_refused_at_spec_time_with_the_formats_that_map():
    with pytest.raises(ConfigError) as e:
        _spec(recipes='["baseline", "rtn(format=int4-g64)"]')
    msg = str(e.value)
    assert "deploy.toml:2: recipes: 'rtn(format=int4-g64)' has no deployable file" in msg
    assert "gguf-q4_0" in msg and "llamacpp(ftype=...)" in msg
    with pytest.raises(ConfigError, match="pruning mask"):
        _spec(recipes='["prune(method=wanda, pattern=2:4) | gptq(format=gguf-q4_0)"]')
    # the same recipes are fine on the torch runtimes (research rows)
    text = DEPLOY.format(model="m", recipes='["rtn(format=int4-g64)"]', tasks='["wikitext2"]')
    text = text.replace('runtime = "llamacpp"', 'runtime = "eager"', 2).replace(
        'runtime = "eager"', 'runtime = "torch"', 1
    )
    assert parse_spec(text, check_models=False).deploy is None


def test_the_runtime_lists_come_from_the_registry():
    from joules.bench import runtime_names

    base = DEPLOY.format(model="m", recipes='["baseline"]', tasks='["wikitext2"]')
    bench_rt = base.rsplit('runtime = "llamacpp"', 1)
    with pytest.raises(ConfigError) as e:
        parse_spec('runtime = "vllm"'.join(bench_rt), check_models=False)
    assert "bench.runtime: unknown runtime 'vllm'; valid: " in str(e.value)
    assert all(name in str(e.value) for name in runtime_names())
    with pytest.raises(ConfigError, match=r"eval.runtime: unknown runtime 'onnx'; valid: torch, "):
        parse_spec(base.replace('runtime = "llamacpp"', 'runtime = "onnx"', 1), check_models=False)


def test_a_task_that_runs_on_torch_models_only_is_refused_on_files():
    with pytest.raises(ConfigError, match="task 'hellaswag' runs on torch models only"):
        _spec(tasks='["wikitext2", "hellaswag"]')


def test_deploy_settings_without_a_file_runtime_are_refused():
    text = 'models = ["m"]\nrecipes = ["baseline"]\n[eval]\ntasks = ["wikitext2"]\n'
    with pytest.raises(ConfigError, match="no runtime runs an exported file"):
        parse_spec(text + '[deploy]\nembedding = "gguf-q8_0"\n', check_models=False)
    with pytest.raises(ConfigError, match=r"deploy\.embedding: .int4-g64. is not a GGUF type"):
        _spec(extra='\n[deploy]\nembedding = "int4-g64"\n')


def test_the_sweep_measures_the_file_it_ships(tiny_dir, tmp_path, monkeypatch):
    """End to end on a tiny llama: baseline (its F32 file), a joules GPTQ Q4_0 export and the
    llama.cpp peer with an importance matrix; store, recommend --export, re-run."""
    from joules.cli import app
    from joules.sweep import Store, run_sweep
    from joules.sweep.stages import default_stages

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    recipes = '["baseline", "gptq(format=gguf-q4_0)", "llamacpp(ftype=Q4_0, imatrix=true)"]'
    spec = _spec(model=str(tiny_dir), recipes=recipes, tasks='["wikitext2", "deviation"]')
    store = str(tmp_path / "deploy.db")
    stages = default_stages(isolate_bench=False)
    summary = run_sweep(spec, store, stages=stages)
    assert summary.failed == 0 and summary.ran == 3, summary.failures
    with Store(store) as st:
        runs = {r.recipe: r for r in st.runs()}
    for recipe, run in runs.items():
        gguf = run.manifest["deploy"]["gguf"]
        size, digest = file_sha256(gguf["path"])
        assert (size, digest) == (gguf["size_bytes"], gguf["sha256"])
        assert run.manifest["model_bytes"] == size  # the figure is the shipped file's
        names = {m.name for m in run.metrics}
        assert {"perplexity", "kld_mean", "tokens_per_s", "model_bytes"} <= names, recipe
        assert run.bench["runtime"] == "llamacpp"
    base_kld = next(m for m in runs["baseline"].metrics if m.name == "kld_mean")
    assert base_kld.value == 0.0  # the baseline's file against itself
    peer = runs["llamacpp(ftype=Q4_0)"].manifest  # the canonical recipe: imatrix=true is default
    assert peer["gguf_file"]["imatrix"] is True and "Q4_0" in peer["deploy"]["gguf"]["types"]
    q4 = runs["gptq(format=gguf-q4_0)"].manifest["deploy"]["gguf"]["types"]
    assert q4.get("Q4_0", 0) > 0 and runs["baseline"].manifest["deploy"]["gguf"]["types"] == {
        "F32": sum(runs["baseline"].manifest["deploy"]["gguf"]["types"].values())
    }

    ship = tmp_path / "ship.gguf"
    r = CliRunner().invoke(
        app, ["recommend", store, "--max-kld", "10", "--objective", "bytes", "--export", str(ship),
              "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    chosen = json.loads(r.stdout)["chosen"]
    shipped = runs[chosen["recipe"]].manifest["deploy"]["gguf"]
    assert file_sha256(ship) == (shipped["size_bytes"], shipped["sha256"])
    assert chosen["recipe"] != "baseline"  # the smallest file, not the F32 one

    from joules.deploy.llamacpp import load_llama

    load_llama(ship, n_ctx=32)  # llama.cpp runs the shipped file

    again = run_sweep(spec, store, stages=stages)
    assert again.ran == 0 and again.skipped == 3
    bad = CliRunner().invoke(app, ["recommend", store, "--export", str(tmp_path / "x.bin")])
    assert bad.exit_code == 2 and "name it e.g. ship.gguf" in bad.output
