"""The report rendered in a real browser (headless chromium): every plot drew, no script error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from joules.report import render_report
from joules.report.html import STYLES, style_kind
from joules.sweep.store import Store
from joules.testing.report import write_fake_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI (.ci/run) installs chromium and sets this, so the browser test fails there instead of skipping.
_SKIP = CHROMIUM is None and not os.environ.get("JOULES_REQUIRE_BROWSER")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
]  # fmt: skip


class _Plots(HTMLParser):
    """Each ``div.joules-plot`` and whether an ``svg.main-svg`` is inside it; the error node."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: list[bool] = []
        self.stack: list[str] = []  # tags, with the open joules-plot div marked
        self.errors: str | None = None
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "joules-plot" in classes:
            self.plots.append(False)
            self.stack.append("PLOT")
        elif tag not in ("br", "img", "meta", "input", "link", "hr", "path", "rect"):
            self.stack.append(tag)
        if tag == "svg" and "main-svg" in classes and "PLOT" in self.stack:
            self.plots[-1] = True
        if tag == "pre" and a.get("id") == "joules-errors":
            self.errors, self._in_errors = "", True

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_errors = False
        while self.stack:
            top = self.stack.pop()
            if top == tag or (top == "PLOT" and tag == "div"):
                break

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors = (self.errors or "") + data


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is not installed (apt-get install -y chromium)"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def _dom(tmp_path: Path, page: Path) -> _Plots:
    dom = _chromium(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout
    parsed = _Plots()
    parsed.feed(dom)
    return parsed


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_every_plot_renders_in_a_browser_without_script_errors(tmp_path: Path) -> None:
    store = write_fake_store(tmp_path / "fake.db")
    page = render_report(store, tmp_path / "report.html")
    text = page.read_text()
    # Self-contained: no external script or stylesheet (plotly.js is inlined).
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=", text)
    n_plots = text.count('class="joules-plot"')
    assert n_plots >= 5  # two quality plots, per layer, timeline, predicted vs measured
    dom = _dom(tmp_path, page)
    assert dom.errors == "", dom.errors
    assert len(dom.plots) == n_plots and all(dom.plots), dom.plots


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_a_script_error_reaches_the_error_node(tmp_path: Path) -> None:
    """The check above can fail: a report whose script throws shows the error in the DOM."""
    page = render_report(write_fake_store(tmp_path / "fake.db"), tmp_path / "report.html")
    text = page.read_text()
    text = text.replace("</body>", "<script>undefinedFunction()</script></body>")
    text = text.replace("</head>", "<script>errorBeforeBody()</script></head>")  # no node yet
    page.write_text(text)
    errors = _dom(tmp_path, page).errors or ""
    assert "undefinedFunction" in errors and "errorBeforeBody" in errors


def test_an_empty_store_renders_notes_not_plots(tmp_path: Path) -> None:
    with Store(tmp_path / "empty.db"):
        pass
    text = render_report(tmp_path / "empty.db", tmp_path / "r.html").read_text()
    assert 'class="joules-plot"' not in text
    assert "No run has both a perplexity and a J/token yet." in text


def test_provenance_names_every_run_and_its_versions(tmp_path: Path) -> None:
    store = write_fake_store(tmp_path / "fake.db")
    text = render_report(store, tmp_path / "r.html").read_text()
    prov = text[text.index("<h2>Provenance</h2>") :]
    with Store(store) as s:
        for r in s.runs():
            assert r.key[:16] in prov and r.recipe.replace("|", "|") in prov
    assert "torch 2.13.0" in prov and "fake failure" in prov


def test_methods_get_distinct_styles() -> None:
    kinds = ["measured", "estimated", "estimated; emulated kernels", "measured; emulated kernels",
             "predicted"]  # fmt: skip
    styles = [STYLES[style_kind(k)] for k in kinds]
    assert len(set(styles)) == len(styles)
    assert style_kind("estimated; emulated kernels") == "estimated; emulated"


def test_hover_names_recipe_and_methods(tmp_path: Path) -> None:
    text = render_report(write_fake_store(tmp_path / "f.db"), tmp_path / "r.html").read_text()
    assert re.search(r"methods: awq, gptq", text)


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_a_store_written_by_the_sweep_runner_renders(tmp_path: Path) -> None:
    """The sweep's own runner (fake stages on a tiny model) writes the store, not our fixture."""
    from joules.sweep import run_sweep
    from joules.sweep.spec import parse_spec
    from joules.testing.sweep import FakeStages, fake_recipe

    spec = parse_spec(
        SWEEP_SPEC, check_models=False, recipe_parser=fake_recipe,
        hardware=("this-machine", "h100"),
    )  # fmt: skip
    db = tmp_path / "sweep.db"
    run_sweep(spec, db, stages=FakeStages().stages(), versions={"joules": "t", "torch": "t"})
    page = render_report(db, tmp_path / "report.html")
    text = page.read_text()
    # quality x2, per-layer bits and weight SQNR (the fake step records it as every real step
    # does), timeline, predicted vs measured
    assert text.count('class="joules-plot"') == 6
    dom = _dom(tmp_path, page)
    assert dom.errors == "" and all(dom.plots) and len(dom.plots) == 6


SWEEP_SPEC = """\
models = ["tiny"]
recipes = ["baseline", "round(bits=8)", "round(bits=4)"]

[eval]
tasks = ["wikitext2"]
limit_tokens = 256
window = 64

[bench]
prompt_len = [16]
gen_len = 4

[predict]
hardware = ["this-machine", "h100"]
"""


def test_pareto_front_and_method_styles_in_the_energy_plot(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import _quality_figure

    data = load_report_data(write_fake_store(tmp_path / "f.db"))
    fig = _quality_figure(data, "j_per_token", "J/token")
    traces = {t.name: t for t in fig.data}
    front = traces["Pareto front (this machine)"]
    # The lowest perplexity and the lowest J/token on this machine are both on the front.
    here = [(r.metric("j_per_token").value, r.metric("perplexity").value, r) for r in data.done]
    best_ppl = min(here, key=lambda p: p[1])[2]
    best_j = min(here, key=lambda p: p[0])[2]
    assert any(best_ppl.recipe in s for s in front.text)
    assert any(best_j.recipe in s for s in front.text)
    assert len(front.x) < len(here)  # the fake store has dominated runs
    # estimated, estimated+emulated and predicted points look different, and say so in the legend
    symbols = {n: t.marker.symbol for n, t in traces.items() if n != front.name and "★" not in n}
    assert symbols["this machine · estimated"] == STYLES["estimated"][0]
    assert symbols["this machine · estimated; emulated"] == STYLES["estimated; emulated"][0]
    assert symbols["h100 · predicted"] == STYLES["predicted"][0]
    assert len(set(symbols.values())) == 3


def test_a_deviation_evals_layer_sqnr_is_plotted(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import _layer_figures
    from joules.sweep.results import extract_metrics

    ev = {"deviation": {"result": {"layers": [{"name": "model.layers.0.mlp", "sqnr_db": 21.5}]}}}
    with Store(tmp_path / "d.db") as s:
        s.begin_run("k", "m", "rtn(format=int4-g64)", None, {}, {})
        s.finish_run("k", wall_s=1, timings={}, eval=ev, bench=None, predictions=None,
                     manifest=None, metrics=extract_metrics(ev, None, None, None))  # fmt: skip
    figs, _ = _layer_figures(load_report_data(tmp_path / "d.db"))
    ((title, fig),) = figs
    assert "SQNR" in title and [list(r) for r in fig.data[0].z] == [[21.5]]
    assert list(fig.data[0].x) == ["0"] and list(fig.data[0].y) == ["mlp"]


def test_timeline_sums_domains_and_puts_decode_after_prefill(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import _timeline_figure

    def phase(t: list[float], cpu: list[float]) -> dict:
        tl = {"t_s": t, "power_w": {"cpu": cpu, "dram": [1.0] * len(t)}}  # PowerTimeline shape
        return {"method": "estimated", "j_per_token": 1.0, "tokens": 1, "timeline": tl}

    bench = {"rows": [{"prefill_energy": phase([0.1, 0.2], [10.0, 20.0]),
                       "decode_energy": phase([0.5], [5.0])}]}  # fmt: skip
    with Store(tmp_path / "t.db") as s:
        s.begin_run("k", "m", "baseline", "w", {}, {})
        s.finish_run("k", wall_s=1, timings={}, eval=None, bench=bench, predictions=None,
                     manifest=None, metrics=[])  # fmt: skip
    fig = _timeline_figure(load_report_data(tmp_path / "t.db"))
    pre, dec = fig.data
    assert list(pre.x) == [0.0, 0.1, 0.2] and list(pre.y) == [11.0, 21.0, 21.0]
    assert list(dec.x) == [0.2, 0.7] and list(dec.y) == [6.0, 6.0]
    assert pre.line.dash == STYLES["estimated"][1] and "estimated" in pre.name


def test_per_format_table_says_which_path_the_bench_ran(tmp_path: Path) -> None:
    """The kernels column comes from the paths the timed forwards took, not from the format
    lab's per-layer ``emulated`` flag (true of every format)."""
    from joules.report.data import load_report_data
    from joules.report.html import _layer_figures, _layer_path
    from joules.testing.report import FAKE_RECIPES

    write_fake_store(tmp_path / "f.db", failed=False)
    _, table = _layer_figures(load_report_data(tmp_path / "f.db"))
    for _, _, fmt, real, _ in FAKE_RECIPES:
        if fmt:
            row = table[table.index(f"<td>{fmt}</td>") :].split("</tr>")[0]
            assert ("kernel:fake/bf16" in row) == real and ("emulated" in row) == (not real)
    layer = "model.layers.0.mlp.up_proj"
    assert (
        _layer_path({"linear_paths": {"kernel:cpu-int4/bf16": 3}}, layer) == "kernel:cpu-int4/bf16"
    )
    assert _layer_path({"linear_paths": {"emulated": 1, "kernel:x": 2}}, layer) is None
    assert _layer_path({"layers": {layer: {"emulated": True}}}, layer) is None


def test_the_recommended_run_is_starred_in_every_plot(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import (
        _layer_figures,
        _predicted_figure,
        _quality_figure,
        _timeline_figure,
        recommended_runs,
    )  # fmt: skip
    from joules.sweep.analyze import Constraints, recommend

    data = load_report_data(write_fake_store(tmp_path / "f.db"))
    rec = recommended_runs(data, Constraints(max_model_bytes=200e6))
    chosen = recommend(data.done, Constraints(max_model_bytes=200e6), "energy").chosen
    assert list(rec) == [chosen.key]
    run = next(r for r in data.done if r.key == chosen.key)
    for x in ("j_per_token", "bits_per_weight"):
        fig = _quality_figure(data, x, x, rec)
        (star,) = [t for t in fig.data if t.name == "★ recommended"]
        assert list(star.x) == [run.metric(x).value]
        assert list(star.y) == [run.metric("perplexity").value]
    pred = _predicted_figure(data, rec)
    assert any(t.name == "★ recommended" for t in pred.data)
    timeline = _timeline_figure(data, rec)
    assert [t.name for t in timeline.data if t.name.startswith("★")] == [
        f"★ recommended · {run.recipe} · {p} · estimated" for p in ("prefill", "decode")
    ]
    figs, _ = _layer_figures(data, rec)
    assert len(figs) == 2  # bits and weight SQNR
    for _, fig in figs:
        shown = [t for t in fig.data if t.visible]
        assert len(shown) == 1 and shown[0].name.startswith(f"★ {run.recipe}")
        menu = fig.layout.updatemenus[0]
        assert menu.buttons[menu.active].label == shown[0].name
    text = render_report(tmp_path / "f.db", tmp_path / "r.html",
                         Constraints(max_model_bytes=200e6)).read_text()  # fmt: skip
    assert 'id="joules-recommended"' in text and run.key[:12] in text


def test_pareto_fronts_are_per_model_never_across(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import _fronts, _quality_figure
    from joules.sweep.analyze import candidates, pareto_front

    db = tmp_path / "two.db"
    write_fake_store(db, model="a")
    write_fake_store(db, seed=1, model="b", failed=False, ppl_scale=3.0)  # dominated by a's
    data = load_report_data(db)
    fronts = _fronts(data, "j_per_token")
    W = "p128/g32/b1/eager"
    assert set(fronts) == {("a", W), ("b", W)}
    for (model, _), pts in fronts.items():
        assert pts and all(label.startswith(f"{model} · ") for _, _, label in pts)
    # b's best perplexity (its baseline) is on b's front, though a's runs beat it everywhere
    b_base = next(r for r in data.done if r.model == "b" and r.recipe == "baseline")
    assert b_base.metric("perplexity").value in [y for _, y, _ in fronts[("b", W)]]
    pooled = pareto_front(candidates(data.done), ["ppl", "energy"])  # what must not be drawn
    assert b_base.key not in {c.key for c in pooled}
    fig = _quality_figure(data, "j_per_token", "J/token")
    assert len([t for t in fig.data if t.name.startswith("Pareto front")]) == 2


def test_the_heatmap_of_a_real_sweep_is_in_model_order(tmp_path: Path) -> None:
    from joules.report.data import load_report_data
    from joules.report.html import _layer_figures
    from joules.sweep import run_sweep
    from joules.sweep.spec import parse_spec
    from joules.testing.sweep import FakeStages, fake_recipe

    spec = parse_spec(SWEEP_SPEC.split("[bench]")[0], check_models=False,
                      recipe_parser=fake_recipe)  # fmt: skip
    run_sweep(spec, tmp_path / "s.db", stages=FakeStages().stages(), versions={"t": "t"})
    figs, table = _layer_figures(load_report_data(tmp_path / "s.db"))
    titles = [t for t, _ in figs]
    assert titles == ["bits/weight per layer", "weight SQNR per layer (dB)"]
    hm = figs[1][1].data[0]
    assert list(hm.x) == ["0", "1"]
    assert list(hm.y) == [
        f"{p}.{k}_proj" for p, ks in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for k in ks
    ]  # fmt: skip
    assert all(v is not None and v > 10 for row in hm.z for v in row)
    assert "mean SQNR (dB)" in table and "<td>-</td>" not in table.split("mean SQNR")[1][:200]


def _raw_dom(tmp_path: Path, page: Path) -> str:
    return _chromium(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout


def _with_script(page: Path, script: str) -> Path:
    """A copy of ``page`` that runs ``script`` 500 ms after load (virtual time) and writes what
    it returns, as JSON, into ``<body data-probe>`` for --dump-dom to carry out."""
    out = page.with_name("probe.html")
    js = (
        "<script>window.addEventListener('load', function () { setTimeout(function () {"
        f"var r = (function () {{ {script} }})();"
        "document.body.setAttribute('data-probe', JSON.stringify(r)); }, 500); });</script>"
    )
    out.write_text(page.read_text().replace("</body>", js + "</body>"))
    return out


def _probe(tmp_path: Path, page: Path, script: str) -> object:
    import html as html_mod
    import json

    dom = _raw_dom(tmp_path, _with_script(page, script))
    m = re.search(r'<body[^>]*\bdata-probe="([^"]*)"', dom)
    assert m, "the probe script did not run"
    return json.loads(html_mod.unescape(m.group(1)))


def _deploy_report(tmp_path: Path) -> tuple[Path, str]:
    from joules.report.answer import answers
    from joules.report.data import load_report_data
    from joules.sweep.analyze import Constraints
    from joules.testing.report import write_fake_deploy_store

    store = write_fake_deploy_store(tmp_path / "deploy.db")
    c = Constraints(max_kld=0.1)
    chosen = answers(load_report_data(store), c)[0].chosen
    return render_report(store, tmp_path / "report.html", c, "energy"), chosen.recipe


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_the_answer_opens_the_page_and_names_the_recommended_file(tmp_path: Path) -> None:
    page, recipe = _deploy_report(tmp_path)
    dom = _dom(tmp_path, page)
    assert dom.errors == "", dom.errors
    assert dom.plots and all(dom.plots), dom.plots
    got = _probe(tmp_path, page, """
        var a = document.querySelector('#joules-answer section.answer');
        var t = document.getElementById('joules-candidates');
        var p = document.querySelector('.joules-plot');
        var box = a.getBoundingClientRect();
        return {text: a.innerText, visible: getComputedStyle(a).display !== 'none',
                height: box.height, top: box.top + window.scrollY,
                table: t.getBoundingClientRect().top + window.scrollY,
                plot: p.getBoundingClientRect().top + window.scrollY,
                heading: a.querySelector('h2').innerText};
    """)  # fmt: skip
    assert got["visible"] and got["height"] > 200
    assert got["top"] < got["table"] < got["plot"]  # the answer first, then the table, then plots
    assert got["heading"].startswith("Ship ") and "gguf-q4_0" in got["heading"]
    text = got["text"]
    assert recipe in text and "runner-up" in text and "llama.cpp peer of the same size" in text
    assert "llama.cpp IQ4_NL +imatrix" in text and "size gap" in text and "Why" in text


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_clicking_a_header_sorts_the_candidate_table(tmp_path: Path) -> None:
    page, _ = _deploy_report(tmp_path)
    got = _probe(tmp_path, page, """
        var rows = function () {
            return Array.prototype.map.call(
                document.querySelectorAll('#joules-candidates tbody tr'),
                function (r) { return r.getAttribute('data-key'); });
        };
        var th = document.querySelector('#joules-candidates th[data-key="model_bytes"]');
        var before = rows(); th.click(); var asc = rows(); th.click(); var desc = rows();
        var kld = document.querySelector('#joules-candidates th[data-key="kld_mean"]');
        kld.click();
        return {before: before, asc: asc, desc: desc, kld: rows(),
                sort: kld.getAttribute('aria-sort')};
    """)  # fmt: skip
    from joules.report.answer import figure
    from joules.report.data import load_report_data

    data = load_report_data(tmp_path / "deploy.db")
    size = {r.key: figure(r, "model_bytes").value for r in data.done}
    kld = {r.key: figure(r, "kld_mean").value for r in data.done}
    assert sorted(got["before"]) == sorted(size) and got["asc"] != got["before"]
    assert [size[k] for k in got["asc"]] == sorted(size.values())
    assert [size[k] for k in got["desc"]] == sorted(size.values(), reverse=True)
    assert [kld[k] for k in got["kld"]] == sorted(kld.values()) and got["sort"] == "ascending"


@pytest.mark.skipif(_SKIP, reason="chromium not installed (.ci/run installs it)")
def test_the_power_timeline_shows_the_runs_a_reader_picks(tmp_path: Path) -> None:
    page, _ = _deploy_report(tmp_path)
    got = _probe(tmp_path, page, """
        var pick = document.querySelector('.joules-pick');
        var div = document.getElementById(pick.getAttribute('data-plot'));
        var drawn = function () { return div.querySelectorAll('g.trace.scatter').length; };
        var boxes = pick.querySelectorAll('input');
        var checked = Array.prototype.filter.call(boxes, function (b) { return b.checked; });
        var before = drawn();
        var off = Array.prototype.filter.call(boxes, function (b) { return !b.checked; })[0];
        off.click();
        return {boxes: boxes.length, checked: checked.map(function (b) {
                    return b.getAttribute('data-run'); }),
                before: before, after: drawn()};
    """)  # fmt: skip
    from joules.report.answer import answers
    from joules.report.data import load_report_data
    from joules.sweep.analyze import Constraints

    a = answers(load_report_data(tmp_path / "deploy.db"), Constraints(max_kld=0.1))[0]
    assert got["boxes"] == 14  # one per run with a bench
    assert sorted(got["checked"]) == sorted([a.chosen.key, a.runner_up.key, a.baseline.key])
    assert got["before"] == 6 and got["after"] == 8  # prefill and decode of each shown run


def test_runs_on_synthetic_weights_are_labelled_and_never_ranked(tmp_path: Path) -> None:
    from joules.models.info import SYNTHETIC_LABEL
    from joules.report.data import load_report_data
    from joules.report.html import recommended_runs
    from joules.sweep.analyze import Constraints

    both = tmp_path / "both.db"
    write_fake_store(both, model="real-135m", failed=False)
    # the synthetic model's runs look better (perplexity / 2) and must still not be chosen
    write_fake_store(both, model="syn-1b", seed=1, ppl_scale=0.5, failed=False, synthetic=True)
    data = load_report_data(both)
    rec = recommended_runs(data, Constraints())
    assert rec and all(r.model == "real-135m" for r in data.done if r.key in rec)
    text = render_report(both, tmp_path / "r.html").read_text()
    n_syn = sum(r.model == "syn-1b" for r in data.done)
    assert f"{n_syn} of {len(data.done)} finished runs" in text and SYNTHETIC_LABEL in text
    table = text[text.index("<h2>Every candidate</h2>") :]
    assert table.count(f">not ranked: {SYNTHETIC_LABEL}<") == n_syn
    only = write_fake_store(tmp_path / "only.db", model="syn-1b", failed=False, synthetic=True)
    text = render_report(only, tmp_path / "o.html").read_text()
    assert 'id="joules-synthetic"' in text and "on real weights" in text
    assert 'id="joules-recommended"' not in text
