"""KL divergence vs file size: series by how each file was made, points from a store and from
the deploy benchmark's rows, one trace per series in size order, and the report's section."""

from __future__ import annotations

from joules.report import render_report
from joules.report.curve import (
    JOULES,
    PEER,
    PEER_IMATRIX,
    TARGET,
    SizePoint,
    rows_points,
    runs_points,
    series_of,
    size_figure,
)
from joules.sweep.store import Store
from joules.testing.report import write_fake_deploy_store


def test_series_of_each_way_of_making_a_file():
    assert series_of("llamacpp(ftype=Q4_0, imatrix=true)") == PEER_IMATRIX
    assert series_of("llamacpp(ftype=Q4_0, imatrix=false)") == PEER
    assert series_of("gguf_mix(bytes=78061152)") == TARGET
    assert series_of("awq(format=gguf-q4_0) | gguf_mix(bytes=1)") == TARGET
    assert series_of("gptq(format=gguf-q4_0)") == JOULES
    assert series_of("", peer=True) == PEER


def test_runs_points_leave_out_the_baseline_and_torch_rows(tmp_path):
    db = write_fake_deploy_store(tmp_path / "d.db")
    with Store(db) as store:
        runs = [r for r in store.runs() if r.status == "done"]
    pts = runs_points(runs)
    assert pts and all(p.label != "baseline" for p in pts)
    assert all(p.size_mib < 200 for p in pts)  # no float baseline squashing the axis
    by = {p.label: p for p in pts}
    q4 = by["llama.cpp Q4_0 +imatrix"]
    assert q4.series == PEER_IMATRIX and abs(q4.kld - 0.155) < 1e-9
    assert by["gptq(gguf-q4_0)"].series == JOULES
    # every point is a run with a GGUF file: the eager torch rows have none
    with_files = sum(1 for r in runs if (r.manifest or {}).get("deploy") and r.recipe != "baseline")
    assert len(pts) == with_files


def test_rows_points_and_figure_traces_in_size_order():
    rows = [
        {"row": "baseline", "kind": "baseline", "size_bytes": 5 << 28, "kld_mean": 0.0},
        {"row": "llamacpp-q4_0+imatrix", "kind": "peer+imatrix", "size_bytes": 91_800_000,
         "kld_mean": 0.17, "kld_mean_ci95": [0.16, 0.18],
         "recipe": "llamacpp(ftype=Q4_0, imatrix=true)"},
        {"row": "llamacpp-q2_k+imatrix", "kind": "peer+imatrix", "size_bytes": 85_000_000,
         "kld_mean": 0.30, "recipe": "llamacpp(ftype=Q2_K, imatrix=true)"},
        {"row": "size-q4_0", "kind": "joules", "size_bytes": 91_700_000, "kld_mean": 0.05,
         "recipe": "gguf_mix(bytes=1)"},
        {"row": "size-q2_k", "kind": "joules", "size_bytes": 84_900_000, "kld_mean": 0.09,
         "recipe": "gguf_mix(bytes=1)"},
        {"row": "gptq-q4_0", "kind": "joules", "size_bytes": 91_800_000, "kld_mean": None,
         "recipe": "gptq(format=gguf-q4_0)"},  # did not finish: no point
    ]  # fmt: skip
    pts = rows_points(rows)
    assert {p.label for p in pts} == {
        "llamacpp-q4_0+imatrix", "llamacpp-q2_k+imatrix", "size-q4_0", "size-q2_k"
    }  # fmt: skip
    fig = size_figure(pts)
    traces = {t.name: t for t in fig.data}
    assert list(traces) == [PEER_IMATRIX, TARGET]  # the series order, empty ones left out
    assert list(traces[TARGET].x) == sorted(traces[TARGET].x)
    assert list(traces[PEER_IMATRIX].y) == [0.30, 0.17]
    assert list(traces[PEER_IMATRIX].error_y.array) == [0.0, 0.18 - 0.17]


def test_size_figure_takes_an_unknown_series():
    fig = size_figure([SizePoint("other", 80.0, 0.1, None, "x")], title="t")
    assert [t.name for t in fig.data] == ["other"] and fig.layout.title.text == "t"


def test_the_report_has_the_size_section(tmp_path):
    db = write_fake_deploy_store(tmp_path / "d.db")
    text = render_report(db, tmp_path / "r.html").read_text()
    assert "KL divergence vs file size" in text
    assert text.count("GGUF file size (MiB)") == 1
