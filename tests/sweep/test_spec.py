"""The sweep spec: the issue's example parses, runs cross as documented, errors name key+line."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError
from joules.sweep.spec import RunConfig, parse_spec

ISSUE_SPEC = """\
models = ["smollm2-135m"]
recipes = ["baseline", "rtn(format=int8-ch)", "gptq(format=int4-g64)", "rtn(format=mxfp4)"]
[eval]
tasks = ["wikitext2"]
limit_tokens = 4096
[bench]
prompt_len = [128]
gen_len = 32
[predict]
hardware = ["this-machine", "h100"]
"""


def test_issue_example_parses_into_one_run_per_recipe():
    spec = parse_spec(ISSUE_SPEC, check_models=False, check_recipes=False)
    runs = spec.runs()
    assert [r.recipe for r in runs] == [
        "baseline",
        "rtn(format=int8-ch)",
        "gptq(format=int4-g64)",
        "rtn(format=mxfp4)",
    ]
    assert {(r.bench.prompt_len, r.bench.gen_len) for r in runs} == {(128, 32)}
    assert runs[0].hardware == ("this-machine", "h100")
    assert runs[0].eval.limit_tokens == 4096 and runs[0].eval.split == "test"


def test_eval_only_and_workload_cross(make_spec):
    eval_only = make_spec('models = ["a", "b"]\nrecipes = ["baseline", "round(bits=4)"]\n[eval]\n')
    runs = eval_only.runs()
    assert len(runs) == 4 and all(r.bench is None and r.hardware == () for r in runs)
    crossed = make_spec(
        'models = ["a"]\nrecipes = ["baseline"]\n[eval]\n[bench]\nprompt_len = [16, 32]\n'
        "gen_len = [4, 8]\nbatch = [1, 2]\n"
    )
    assert len(crossed.runs()) == 8
    # Runs of one recipe are adjacent, so its compressed model is built once.
    two = make_spec(
        'models = ["a"]\nrecipes = ["baseline", "round(bits=4)"]\n[eval]\n[bench]\n'
        "prompt_len = [16, 32]\ngen_len = 4\n"
    )
    assert [r.recipe for r in two.runs()] == ["baseline"] * 2 + ["round(bits=4)"] * 2


def test_recipes_are_canonicalised_by_the_parser(make_spec):
    spec = make_spec('models = ["a"]\nrecipes = ["round( bits=4 )"]\n[eval]\n')
    assert spec.recipes == ("round(bits=4)",)


def _error(make_spec, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        make_spec(text, path="s.toml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown task: its line (4), the key, the valid tasks
        (
            'models = ["a"]\nrecipes = ["baseline"]\n[eval]\ntasks = ["wikitext2", "mmlu"]\n',
            ("s.toml:4", "eval.tasks", "'mmlu'", "valid: wikitext2"),
        ),
        # a bad recipe inside a multi-line array: the value's own line (3)
        (
            'models = ["a"]\nrecipes = [\n  "round(bits=99)",\n]\n[eval]\n',
            ("s.toml:3", "recipes", "round(bits=N)"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline"]\n[eval]\n[bench]\nprompt_len = [0]\ngen_len = 4\n',
            ("s.toml:5", "bench.prompt_len", "integers ≥ 1"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline"]\n[eval]\n[predict]\nhardware = ["tpu-v9"]\n',
            ("s.toml:5", "predict.hardware", "'tpu-v9'", "this-machine, h100"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline"]\nepochs = 3\n[eval]\n',
            ("s.toml:3", "epochs", "unknown key", "models"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline"]\n[eval]\nsplit = "valid"\n',
            ("s.toml:4", "eval.split", "valid: test"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline"]\n[eval]\n[bench]\ngen_len = 4\n',
            ("s.toml:4", "bench.prompt_len", "missing"),
        ),
        (
            'models = ["a"]\nrecipes = ["baseline", "baseline"]\n[eval]\n',
            ("s.toml:2", "recipes", "listed twice"),
        ),
    ],
)
def test_errors_name_key_line_and_valid_values(make_spec, text, expected):
    msg = _error(make_spec, text)
    for part in expected:
        assert part in msg, msg


def test_missing_eval_table_and_bad_toml(make_spec):
    assert "[eval]" in _error(make_spec, 'models = ["a"]\nrecipes = ["baseline"]\n')
    assert "not valid TOML" in _error(make_spec, "models = [\n")


def test_unknown_model_is_checked_when_asked():
    with pytest.raises(ConfigError, match="models"):
        parse_spec(
            'models = ["/no/such/model"]\nrecipes = ["baseline"]\n[eval]\n', check_recipes=False
        )


def test_key_hashes_config_and_versions(spec):
    a, b = spec.runs()[:2]
    v = {"joules": "0.1.0", "torch": "2.13.0"}
    assert a.key(v) == a.key(dict(v)) and a.key(v) != b.key(v)
    assert a.key(v) != a.key({**v, "torch": "2.14.0"})
    assert RunConfig.from_dict(a.to_dict()) == a
    assert RunConfig.from_dict(a.to_dict()).key(v) == a.key(v)


def test_target_size_axis_adds_one_gguf_mix_recipe_per_size(tmp_path, monkeypatch):
    from joules.deploy.size import size_plan
    from joules.models import save_tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    tiny = save_tiny_model(tmp_path / "t", "llama", seed=0, hidden_size=256,
                           intermediate_size=512, tie_word_embeddings=True)  # fmt: skip
    text = (
        f'models = ["{tiny}"]\nrecipes = ["baseline"]\ntarget_size = ["900KB", "1.2MB"]\n'
        '[eval]\ntasks = ["wikitext2", "deviation"]\nruntime = "llamacpp"\n'
        '[bench]\nprompt_len = [8]\ngen_len = 4\nruntime = "llamacpp"\n'
    )
    spec = parse_spec(text)
    budgets = [size_plan(str(tiny), n).budget_bytes for n in (900_000, 1_200_000)]
    assert spec.recipes == ("baseline", *(f"gguf_mix(bytes={b})" for b in budgets))
    # a size below the smallest file, and two models, are refused at spec time in one line
    with pytest.raises(ConfigError, match=r"target_size: target size 1,000 bytes: the smallest"):
        parse_spec(text.replace('"900KB"', '"1KB"'))
    two = text.replace(f'models = ["{tiny}"]', f'models = ["{tiny}", "smollm2-135m"]')
    with pytest.raises(ConfigError, match="one model per spec"):
        parse_spec(two)
    with pytest.raises(ConfigError, match="target_size"):
        parse_spec(text.replace('"900KB"', '"ninety"'))
