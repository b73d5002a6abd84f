"""The report's answer: the file recommend chooses, set beside the runner-up and the llama.cpp
peer of the same size, with why; the candidate table; the plots' labels and log axis."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from joules.report import render_report
from joules.report.answer import (
    answers,
    figure,
    format_interval,
    format_metric,
    ppl_ratio,
    quality_metric,
    role_of,
    same_size_peer,
    short_label,
)
from joules.report.data import load_report_data
from joules.report.html import _candidate_table, _place_labels, _quality_figure
from joules.sweep.analyze import Constraints, recommend
from joules.testing.report import FAKE_DEPLOY_RUNS, write_fake_deploy_store, write_fake_store

DEPLOY = "p64/g32/b1/llamacpp"


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_deploy_store(tmp_path_factory.mktemp("d") / "deploy.db")


def _run(data, recipe: str, workload: str = DEPLOY):
    return next(r for r in data.done if r.recipe == recipe and r.workload == workload)


def test_the_answer_is_recommends_choice_beside_runner_up_and_same_size_peer(deploy: Path):
    data = load_report_data(deploy)
    c = Constraints(max_kld=0.1)
    ans = answers(data, c, "energy")
    assert [a.workload for a in ans] == [DEPLOY, "p64/g32/b1/eager"]  # deployable first
    a = ans[0]
    rec = recommend([r for r in data.done if r.workload == DEPLOY], c, "energy", None, DEPLOY)
    assert a.deployable and a.chosen.key == rec.chosen.key and a.runner_up.key == rec.runner_up.key
    assert a.chosen.recipe == "gptq(format=gguf-q4_0)"
    # three llama.cpp files share its size (91.7 MB): the peer is the best of them by KLD
    assert a.peer.recipe == "llamacpp(ftype=IQ4_NL, imatrix=true)" and a.peer_gap_bytes == 0
    assert a.baseline.recipe == "baseline" and a.baseline.workload == DEPLOY
    why = " ".join(a.why())
    # the constraint decided: cheaper llama.cpp Q4_0 files miss the KLD limit
    assert "Decided by --max-kld 0.1" in why and "llama.cpp Q4_0 +imatrix" in why
    assert "violated" in why
    assert short_label(a.runner_up.recipe) in why and "J/token" in why
    # research rows get their own answer, and no llama.cpp peer from another runtime
    assert ans[1].runtime == "eager" and not ans[1].deployable and ans[1].peer is None


def test_a_tighter_limit_changes_the_answer(deploy: Path):
    data = load_report_data(deploy)
    loose = answers(data, Constraints(max_kld=0.1))[0].chosen
    tight = answers(data, Constraints(max_kld=0.03))[0]
    assert tight.chosen.key != loose.key
    assert figure(tight.chosen, "kld_mean").hi <= 0.03
    assert "Decided by --max-kld 0.03" in " ".join(tight.why())
    excluded = {b["excluded"] for b in tight.recommendation.bound_by}
    assert "smollm2-135m · llamacpp(ftype=Q4_K_M, imatrix=true)" in excluded  # KLD 0.031


def test_a_kld_interval_straddling_the_limit_does_not_meet_it(deploy: Path):
    data = load_report_data(deploy)
    gptq = _run(data, "gptq(format=gguf-q4_0)")
    kld = figure(gptq, "kld_mean")
    assert kld.lo < kld.value < kld.hi
    a = answers(data, Constraints(max_kld=(kld.value + kld.hi) / 2))[0]
    assert a.chosen.key != gptq.key
    check = next(c for c in a.recommendation.candidates if c.key == gptq.key).checks[0]
    assert check.status == "undecided"


def test_the_peer_of_the_same_size_is_the_nearest_and_states_the_gap(deploy: Path):
    data = load_report_data(deploy)
    q4k = _run(data, "gptq(format=gguf-q4_k)")
    peer, gap = same_size_peer(data.done, q4k)
    assert peer.recipe == "llamacpp(ftype=Q4_K_M, imatrix=true)"
    assert gap == pytest.approx(0.2e6, abs=1)
    base = _run(data, "baseline")
    peer, gap = same_size_peer(data.done, base)  # 538 MB: the biggest peer, Q8_0
    assert peer.recipe.startswith("llamacpp(ftype=Q8_0") and gap < -390e6
    eager = _run(data, "gptq(format=int4-g64)", "p64/g32/b1/eager")
    assert same_size_peer(data.done, eager) == (None, None)


def test_roles_and_labels(deploy: Path):
    data = load_report_data(deploy)
    roles = {(r.recipe, r.workload): role_of(r) for r in data.done}
    assert roles[("llamacpp(ftype=Q4_0, imatrix=true)", DEPLOY)] == "llama.cpp peer"
    assert roles[("gptq(format=gguf-q4_0)", DEPLOY)] == "deployable"
    assert roles[("gptq(format=int4-g64)", "p64/g32/b1/eager")] == "research"
    assert short_label("llamacpp(ftype=IQ4_NL, imatrix=false)") == "llama.cpp IQ4_NL"


def test_without_kld_the_quality_is_the_perplexity_ratio(tmp_path: Path):
    data = load_report_data(write_fake_store(tmp_path / "old.db"))
    assert quality_metric(data.done) == "perplexity"
    r = next(r for r in data.done if r.recipe != "baseline")
    inc, ratio = r.metric("ppl_increase_pct"), ppl_ratio(r)
    if inc is not None:
        assert ratio.value == pytest.approx(1 + inc.value / 100)
    table = _candidate_table(data, answers(data))
    assert "mean KLD" not in table.split("</thead>")[0]
    assert "No run has a KL divergence" in table
    text = render_report(tmp_path / "old.db", tmp_path / "r.html").read_text()
    assert "Perplexity vs energy per token" in text and 'id="joules-answer"' in text


def test_the_table_lists_every_candidate_with_sortable_values(deploy: Path):
    data = load_report_data(deploy)
    table = _candidate_table(data, answers(data, Constraints(max_kld=0.1)))
    keys = re.findall(r'<tr data-key="([^"]+)"', table)
    assert sorted(keys) == sorted(r.key for r in data.done) and len(keys) == len(FAKE_DEPLOY_RUNS)
    head = table.split("</thead>")[0]
    for col in ("size", "bits/weight", "mean KLD", "perplexity ratio", "decode tok/s", "J/token",
                "methods"):  # fmt: skip
        assert col in head, col
    gptq = _run(data, "gptq(format=gguf-q4_0)")
    row = table.split(f'<tr data-key="{gptq.key}"')[1].split("</tr>")[0]
    assert row.count('class="num"') == 7 and "★ ship" in row
    assert f'data-v="{float(figure(gptq, "model_bytes").value)!r}"' in row
    kld = figure(gptq, "kld_mean")
    ci = format_interval("kld_mean", kld)
    assert format_metric("kld_mean", kld, False) in row and ci.startswith("[") and ci in row
    assert 'class="m"' in row  # energy is estimated: marked


def test_quality_plot_labels_points_on_a_log_axis(deploy: Path):
    data = load_report_data(deploy)
    rec = {answers(data, Constraints(max_kld=0.1))[0].chosen.key: "why"}
    fig = _quality_figure(data, "bits_per_weight", "bits/weight", rec, "kld_mean")
    assert fig.layout.xaxis.type == "log"
    points = [t for t in fig.data if t.name.startswith("this machine")]
    xs = [x for t in points for x in t.x]
    assert max(xs) == pytest.approx(32.0, rel=0.01)  # the fp32 baseline, on the same axis
    hovers = " ".join(h for t in points for h in t.hovertext)
    for recipe, *_ in FAKE_DEPLOY_RUNS:
        assert recipe in hovers.replace("&#x27;", "'")
    labels = [x for t in points for x in t.text if x]
    assert "gptq(gguf-q4_0)" in labels  # the recommended run is labelled first
    assert len(labels) >= len(xs) // 2


def test_label_placement_avoids_collisions():
    pts = [("a", 1.0, 1.0, "first"), ("b", 1.0, 1.0, "second"), ("c", 1.0, 1.0, "third"),
           ("d", 1.0, 1.0, "fourth"), ("e", 1.0, 1.0, "fifth"), ("f", 10.0, 0.0, "far")]  # fmt: skip
    placed = _place_labels(pts, ["c"])
    assert placed["c"] == ("middle right", "third")  # first in order, first position
    # four positions around one point: four of the five labels, each in its own; one is hover only
    same = [placed[k][0] for k in "abcde" if k in placed]
    assert len(same) == 4 and len(set(same)) == 4
    assert placed["f"][1] == "far"  # a point alone keeps its label


runner = CliRunner()


def test_report_cli_takes_the_answers_constraints(deploy: Path, tmp_path: Path):
    from joules.cli import app

    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(deploy), "-o", str(out), "--max-kld", "0.03",
                              "--objective", "energy"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = load_report_data(deploy)
    chosen = answers(data, Constraints(max_kld=0.03))[0].chosen
    answer = out.read_text().split('id="joules-answer"')[1].split('id="joules-candidates"')[0]
    assert f'data-chosen="{chosen.key}"' in answer
    for bad, msg in ((["--max-kld", "lots"], "--max-kld"), (["--objective", "joy"], "--objective"),
                     (["--max-ppl-increase", "x"], "percentage")):  # fmt: skip
        res = runner.invoke(app, ["report", str(deploy), "-o", str(out), *bad])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output
