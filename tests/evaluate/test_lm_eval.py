"""lm-eval adapter: a task defined locally over shipped HellaSwag items runs on a joules model and
agrees with `choice_accuracy`; rolling log-likelihood agrees with our perplexity."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from joules.data import load_choice
from joules.evaluate.choice import choice_accuracy
from joules.evaluate.perplexity import perplexity

# lm-eval's own HellaSwag task (lm_eval/tasks/hellaswag), on llama.cpp's text: the same
# preprocess, doc_to_text, doc_to_choice, target and metrics; only the data source differs.
TASK_YAML = """\
task: joules_local_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""

TASK_UTILS = """\
from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    def _process_doc(doc):
        return {
            "query": preprocess(doc["context"]),
            "choices": [preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)
"""


def _item_indices() -> list[int]:
    """Items where preprocess changes the text, items with non-ASCII endings, and the first 8."""
    raw = load_choice("hellaswag", preprocess=False)
    done = load_choice("hellaswag")
    changed = [i for i, (a, b) in enumerate(zip(raw, done, strict=True)) if a != b][:6]
    non_ascii = [i for i, it in enumerate(raw) if not all(e.isascii() for e in it.endings)][:6]
    return sorted({*range(8), *changed, *non_ascii})


def test_hellaswag_choices_equal_lm_evals_own_metric_code(tiny, tmp_path, monkeypatch):
    """Same docs, lm-eval's task code (preprocess, requests, metrics) through the adapter, and
    joules' own scorer: the same ending picked by acc, acc_norm and acc_bytes on every item."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from joules.evaluate.lm_eval import JoulesLM

    idx = _item_indices()
    raw = load_choice("hellaswag", preprocess=False)
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"context": raw[i].context, "endings": list(raw[i].endings), "label": raw[i].label}
            )
            + "\n"
            for i in idx
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "utils.py").write_text(TASK_UTILS)
    manager = TaskManager(include_path=str(tasks))
    out = simple_evaluate(
        model=JoulesLM.from_loaded(tiny.model, tiny.tokenizer),
        tasks=["joules_local_hellaswag"],
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=True,
    )
    task = get_task_dict(["joules_local_hellaswag"], manager)["joules_local_hellaswag"]
    samples = sorted(out["samples"]["joules_local_hellaswag"], key=lambda s: s["doc_id"])
    assert len(samples) == len(idx)

    def lm_eval_pick(doc, resps, metric):
        # lm-eval's process_results says whether its pick equals the label: try every label
        wins = [
            k
            for k in range(len(doc["choices"]))
            if task.process_results({**doc, "label": k}, resps)[metric] == 1.0
        ]
        assert len(wins) == 1
        return wins[0]

    ours = choice_accuracy(tiny.model, tiny.tokenizer, [load_choice("hellaswag")[i] for i in idx])
    for metric, picks in (
        ("acc", ours.predictions),
        ("acc_norm", ours.predictions_norm),
        ("acc_bytes", ours.predictions_bytes),
    ):
        theirs = [lm_eval_pick(s["doc"], s["filtered_resps"], metric) for s in samples]
        assert theirs == picks, metric
    # the docs lm-eval built are joules' preprocessed items, string for string
    for s, i in zip(samples, idx, strict=True):
        item = load_choice("hellaswag")[i]
        assert (s["doc"]["query"], tuple(s["doc"]["choices"])) == (item.context, item.endings)
    res = out["results"]["joules_local_hellaswag"]
    assert res["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert res["acc_bytes,none"] == pytest.approx(ours.acc_bytes)


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
