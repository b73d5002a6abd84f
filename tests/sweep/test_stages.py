"""The real stages: the timed bench runs alone in a subprocess; every registered task runs."""

from __future__ import annotations

import pytest
import torch

from joules.compress.modules.linear import CompressedLinear
from joules.evaluate import tasks
from joules.sweep import stages
from joules.sweep.spec import BenchSpec, EvalSpec, known_tasks, parse_spec


def test_each_bench_measures_its_model_alone_in_a_subprocess(tiny_dir):
    """The sweep's process holds the base model of every run, its compressed copy and more
    (here: a synthetic 600 MB block); in process, a run's peak RSS included all of it, so
    ``--max-peak-rss`` could never favour a smaller model. The child holds only its model."""
    import psutil

    model, tok, info = stages.load(str(tiny_dir), "float32")
    held = torch.ones(150_000_000)  # 600 MB this process holds, as the sweep holds models
    parent_rss = psutil.Process().memory_info().rss
    assert parent_rss > 600e6
    b = BenchSpec(prompt_len=8, gen_len=3, repeats=1, warmup=0)
    base = stages.bench(model, tok, info, b, None, probe_if_missing=False)
    small, _ = stages.compress(model, "rtn(format=int8-ch)", (None, {}), tok, info, None)
    assert any(isinstance(m, CompressedLinear) for m in small.modules())
    seen: list[tuple[int, int]] = []
    got = stages.bench(small, tok, info, b, lambda d, t: seen.append((d, t)),
                       probe_if_missing=False)  # fmt: skip
    for r in (base, got):
        peak = r["rows"][0]["peak_rss_bytes"]
        assert peak < parent_rss - 500e6, (peak, parent_rss)  # none of the parent's memory
        iso = r["isolation"]
        assert iso["mode"] == "subprocess" and iso["load_s"] > 0
        assert iso["rss_after_load_bytes"] <= peak
    assert float(held[0]) == 1.0
    assert got["isolation"]["save_s"] > 0 and base["isolation"]["save_s"] == 0
    assert got["model"] == base["model"] == str(tiny_dir)  # not the temporary directory
    assert seen and seen[-1][0] == seen[-1][1]  # the child's progress reached the parent
    # The kernel paths are those of the child's timed forwards.
    paths = stages.layer_paths(small)
    assert set(paths) == {n for n, m in small.named_modules() if isinstance(m, CompressedLinear)}


def test_the_bench_subprocess_reports_its_failure_in_one_line(tiny):
    model, tok, info = tiny
    b = BenchSpec(prompt_len=8, gen_len=3, repeats=1, warmup=0)
    with pytest.raises(RuntimeError, match="bench subprocess failed: "):
        stages.bench(model, tok, info, b, None, probe_if_missing=False)  # not a loadable spec


def test_the_sweep_takes_its_tasks_from_the_registry():
    assert known_tasks() == tuple(tasks.names())
    text = 'models = ["m"]\nrecipes = ["baseline"]\n[eval]\ntasks = ["{}"]\nlimit = 4\n'

    @tasks.register("joules-test-task")
    class _T(tasks.Task):  # a task registered after the sweep was written
        def run(self, model, tokenizer, info, progress=None):
            raise NotImplementedError

    try:
        for name in tasks.names():
            spec = parse_spec(text.format(name), check_models=False, check_recipes=False)
            assert spec.eval.tasks == (name,) and spec.eval.limit == 4
    finally:
        tasks.TASKS.unregister("joules-test-task")


def test_every_task_gets_the_protocol_options_it_accepts():
    ev = EvalSpec(tasks=(), limit_tokens=128, window=32, limit=5)
    assert stages.task_options("wikitext2", ev) == {
        "split": "test", "window": 32, "stride": None, "limit_tokens": 128,
    }  # fmt: skip
    assert stages.task_options("hellaswag", ev) == {"limit": 5}
    assert stages.task_options("attention-deviation", ev) == {}


def test_hellaswag_evaluates_with_per_item_correctness(tiny):
    model, tok, info = tiny
    ev = EvalSpec(tasks=("hellaswag",), limit=6)
    out = stages.evaluate("hellaswag", model, tok, info, ev, None)
    res = out["result"]
    assert res["n"] == 6 and len(out["items"]) == 6
    assert sum(out["item_correct"]) == res["correct_norm"]
