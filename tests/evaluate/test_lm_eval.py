"""lm-eval adapter: a task defined locally over shipped HellaSwag items runs on a joules model and
agrees with `choice_accuracy`; rolling log-likelihood agrees with our perplexity."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from joules.data import load_choice
from joules.evaluate.choice import choice_accuracy
from joules.evaluate.perplexity import perplexity

TASK_YAML = """\
task: joules_local_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: endings
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_local_task_runs_and_matches_choice_accuracy(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from joules.evaluate.lm_eval import JoulesLM

    items = load_choice("hellaswag")[:12]
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(
            json.dumps({"context": it.context, "endings": list(it.endings), "label": it.label})
            + "\n"
            for it in items
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK_YAML.format(data=data))
    out = simple_evaluate(
        model=JoulesLM.from_loaded(tiny.model, tiny.tokenizer),
        tasks=["joules_local_hellaswag"],
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=0,
        log_samples=False,
    )
    res = out["results"]["joules_local_hellaswag"]
    ours = choice_accuracy(tiny.model, tiny.tokenizer, items)
    assert res["acc,none"] == pytest.approx(ours.acc)
    assert res["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_rolling_loglikelihood_matches_perplexity_with_bos(tiny):
    from joules.evaluate.lm_eval import JoulesLM

    lm = JoulesLM.from_loaded(tiny.model, tiny.tokenizer, max_length=64)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (ll,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    r = perplexity(tiny.model, tiny.tokenizer, text, window=10_000, add_bos=True)
    # lm-eval's windows of 64 give each token less context than one long window: close, not equal
    short = perplexity(tiny.model, tiny.tokenizer, text[:60], window=10_000, add_bos=True)
    (ll_short,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text[:60],))])
    assert ll_short == pytest.approx(-short.nll_mean * short.tokens_scored, rel=1e-5)
    assert ll == pytest.approx(-r.nll_mean * r.tokens_scored, rel=0.05)


def test_registered_under_the_name_joules():
    from lm_eval.api.registry import get_model

    import joules.evaluate.lm_eval as adapter

    assert get_model("joules") is adapter.JoulesLM
