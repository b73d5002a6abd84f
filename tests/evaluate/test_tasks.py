"""The task registry: each task names its progress unit, options are checked, results equal the
library functions, and deviation labels its reference with the dtype it really has."""

from __future__ import annotations

import pytest
import torch

from joules.data import load_text
from joules.errors import ConfigError
from joules.evaluate import tasks
from joules.evaluate.perplexity import perplexity


def test_each_task_names_what_its_progress_counts():
    # the CLI's progress bar reads these off the classes (they were a hand-kept dict in cli/eval)
    units = {name: tasks.task_class(name).progress_unit for name in tasks.names()}
    assert units == {
        "wikitext2": "tokens", "hellaswag": "items", "deviation": "tokens",
        "attention-deviation": "attention grid",
    }  # fmt: skip


def test_run_task_equals_the_library_function(tiny):
    r = tasks.run_task(
        "wikitext2", tiny.model, tiny.tokenizer, tiny.info, window=64, limit_tokens=200
    )
    lib = perplexity(
        tiny.model, tiny.tokenizer, load_text("wikitext2"), window=64, limit_tokens=200
    )
    assert r.perplexity == pytest.approx(lib.perplexity, rel=1e-9)
    assert r.to_dict()["protocol"]["window"] == 64


def test_get_returns_the_config_and_rejects_unknown_options_and_tasks():
    cfg = tasks.get("hellaswag", limit=5, seed=3)
    assert (cfg.limit, cfg.seed, cfg.kv_reuse) == (5, 3, True)
    with pytest.raises(ConfigError, match=r"has no option window: its options are data, limit"):
        tasks.get("hellaswag", window=64)
    with pytest.raises(ConfigError, match="unknown task 'mmlu'"):
        tasks.get("mmlu")


def test_default_dtypes():
    # quality figures never depend on a speed probe: every task computes in fp32 unless asked
    for name in ("wikitext2", "hellaswag", "deviation"):
        assert tasks.task_class(name).default_dtype == "fp32"
    assert not tasks.task_class("attention-deviation").needs_model


def test_deviation_reference_label_says_its_real_dtype():
    from joules.models import tiny_model

    model, tok, info = tiny_model("llama", seed=0)
    model = model.to(torch.bfloat16)
    opts = {"window": 32, "limit_tokens": 64, "sqnr": "none"}
    r = tasks.run_task("deviation", model, tok, info, weights_format="int8", **opts)
    # the reference is the bf16 model itself (only the format differs), and is labelled so
    assert r.protocol.reference.endswith("(bf16)")
    assert r.protocol.model.endswith("(int8, emulated) (bf16)")
