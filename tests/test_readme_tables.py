"""Every table in README.md and the docs site that cites a benchmark's results JSON matches it.

The measured tables live on the docs site's result pages (``docs/results/*.md``) and the
README keeps one headline table; every page is scanned, so a table moved between pages stays
checked. A table is tied to its JSON by a marker comment on the line before it:

    <!-- bench: results/NAME.json rows=PATH key=FIELD cols=HEADER=FIELD; HEADER=FIELD*100 -->

* ``results/NAME.json`` is relative to ``benchmarks/`` (the file a benchmark wrote and we committed);
* ``rows=PATH``: the dotted path of a list of objects in that JSON, one per table row;
* ``key=FIELD``: the table's first column holds that field of the row's object, exactly
  (a pipe inside a cell is written ``\\|``); ``key=F1,F2``: the first two columns hold those
  fields and together name one row;
* ``cols=``: every other column's header, ``=``, the field it shows (optionally ``*SCALE``,
  e.g. a fraction shown in %). A column without a mapping fails the test: no figure goes
  unchecked.

A cell's leading number is compared with the field rounded to as many decimals as the cell
shows (``2.57x`` checks the field to 2 decimals; text after the number is commentary); ``-``
stands for null; any other cell must equal the field as text. A cell written as code
(```kvcache(format=int4)```) is compared without its backticks. Adding a table for another
benchmark needs only a marker.

Figures in prose next to a table (a peer's time, a ratio range) have their own tests below, each
reading the same JSON as the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
README = ROOT / "README.md"
# Every page a reader sees: the README and the docs site's sources.
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*bench:\s*(?P<file>\S+)\s+(?P<opts>.*?)\s*-->")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.(\d+))?")


def _marked_tables(text: str) -> list[tuple[dict[str, Any], list[str], list[list[str]], int]]:
    """(marker options, header, rows, line number) of each marked table."""
    lines = text.splitlines()
    tables = []
    fenced = False  # a marker shown inside a ``` code block (the docs explain them) is no marker
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = MARKER.search(line)
        if not m or fenced:
            continue
        opts: dict[str, Any] = {"file": m["file"]}
        rest = m["opts"]
        cols_at = rest.find("cols=")
        if cols_at >= 0:
            cols = rest[cols_at + len("cols=") :]
            rest = rest[:cols_at]
            opts["cols"] = dict(c.strip().split("=", 1) for c in cols.split(";") if c.strip())
        for tok in rest.split():
            k, _, v = tok.partition("=")
            opts[k] = v
        body = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            cells = re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|"))
            body.append([c.strip().replace("\\|", "|") for c in cells])
        assert len(body) >= 3, f"line {i + 1}: a bench marker must precede a table"
        tables.append((opts, body[0], body[2:], i + 1))
    return tables


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part]
    return obj


def check_cell(cell: str, value: Any) -> str | None:
    """None if ``cell`` shows ``value`` (by the module's rule), else what is wrong."""
    if len(cell) > 2 and cell.startswith("`") and cell.endswith("`"):
        cell = cell[1:-1]
    if cell in ("-", "–"):
        return None if value is None else f"{cell!r} but the JSON has {value!r}"
    if value is None:
        return f"{cell!r} but the JSON has null"
    m = NUMBER.match(cell)
    if m and isinstance(value, int | float) and not isinstance(value, bool):
        decimals = len(m.group(1) or "")
        shown = m.group(0).replace(",", "")
        expected = f"{value:.{decimals}f}"
        return None if float(shown) == float(expected) else f"{cell!r}, JSON gives {expected}"
    return None if cell == str(value) else f"{cell!r} but the JSON has {value!r}"


def _field(row: dict[str, Any], spec: str) -> Any:
    name, _, scale = spec.partition("*")
    v = _get(row, name.strip())
    return v * float(scale) if scale and v is not None else v


def _where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


TABLES = [
    (opts, header, rows, _where(page, line))
    for page in PAGES
    for opts, header, rows, line in _marked_tables(page.read_text())
]


def _all_text() -> str:
    """README and every docs page: prose figures are checked wherever they now stand."""
    return "\n\n".join(page.read_text() for page in PAGES)


def test_pages_have_bench_tables():
    """The 21 marked tables (20 on the result pages, the deploy table again in the README)."""
    assert len(TABLES) >= 21, [t[3] for t in TABLES]
    assert any(t[3].startswith("README.md:") for t in TABLES), "the README's headline table"


@pytest.mark.parametrize(("opts", "header", "rows", "line"), TABLES, ids=[t[3] for t in TABLES])
def test_table_rows_match_the_committed_json(opts, header, rows, line):
    path = BENCHMARKS / opts["file"]
    assert path.is_file(), f"{line} cites {path}, which is not committed"
    data = json.loads(path.read_text())
    assert "command" in data and "machine" in data, f"{path.name}: no command/machine recorded"
    assert "cpu_flags" in data["machine"], f"{path.name}: machine has no CPU flags"
    objs = _get(data, opts["rows"])
    keys = opts["key"].split(",")
    nk = len(keys)
    cols = opts.get("cols", {})
    unmapped = [h for h in header[nk:] if h not in cols]
    assert not unmapped, f"{line}: columns {unmapped} map to no JSON field"
    assert rows
    problems = []
    for cells in rows:
        found = [o for o in objs if [str(o.get(k)) for k in keys] == cells[:nk]]
        if len(found) != 1:
            problems.append(f"row {cells[:nk]!r}: {len(found)} JSON rows with {keys} = it")
            continue
        for h, cell in zip(header[nk:], cells[nk:], strict=True):
            err = check_cell(cell, _field(found[0], cols[h]))
            if err:
                problems.append(f"row {cells[0]!r}, column {h!r}: {err}")
    assert not problems, f"{line} vs {opts['file']}:\n" + "\n".join(problems)


def test_the_rule_catches_a_wrong_figure():
    assert check_cell("2.57x", 2.5712) is None
    assert check_cell("2.58x", 2.5712) is not None
    assert check_cell("0 (exact)", 0.0004) is None
    assert check_cell("-", None) is None and check_cell("-", 1.0) is not None
    assert check_cell("1,445 µs", 1445.3) is None
    assert check_cell("torch .to(x)", "torch .to(x)") is None
    assert check_cell("`-`", None) is None and check_cell("`rtn(x)`", "rtn(x)") is None
    assert check_cell("`rtn(x)`", "rtn(y)") is not None


def test_nxfp_gain_sentence_matches_the_compare_json():
    """The prose under the formats table derives from the same JSON as the table."""
    text = _all_text()
    m = re.search(r"gain \+([\d.]+) dB over MXFP4 for ([\d.]+) more bits", text)
    assert m, "the NxFP sentence is gone: update this test"
    res = {
        r["format"]: r
        for r in json.loads((BENCHMARKS / "results/formats_compare.json").read_text())["results"]
    }
    gain = res["nxfp4"]["sqnr_db"] - res["mxfp4"]["sqnr_db"]
    bits = res["nxfp4"]["bits_per_element"] - res["mxfp4"]["bits_per_element"]
    assert f"{gain:.2f}" == m.group(1) and f"{bits:.3f}" == m.group(2)


def test_estimator_constants_quoted_in_the_readme():
    """±30 %, 0.375 W per GiB and 30 % of TDP at idle are the code's and data's values."""
    from joules.measure.carbon import hardware_table
    from joules.measure.estimate import ESTIMATE_RELATIVE_UNCERTAINTY

    text = _all_text()
    table = hardware_table()
    assert ESTIMATE_RELATIVE_UNCERTAINTY == 0.30 and "±30 % band" in text
    assert table["memory"]["w_per_gib"] == 0.375 and "0.375 W per GiB" in text
    assert table["cpu_defaults"]["idle_fraction"] == 0.3 and "30 % of TDP at idle" in text


def _results(name: str) -> dict[str, Any]:
    return json.loads((BENCHMARKS / "results" / name).read_text())


def test_fit_columns_peer_sentence_matches_its_json():
    """The rank-1 update time quoted above the fit-columns table is the same run's peer."""
    text = _all_text()
    m = re.search(r"128-column block \((\d+) µs in the same run\)", text)
    assert m, "the fit-columns peer sentence is gone: update this test"
    assert int(m.group(1)) == round(_results("fit_columns.json")["peer_rank1_update_us"])


def _attention_cell(row: dict[str, Any]) -> str:
    return f"{row['max_abs_dev']:.1e} / {row['mean_abs_dev']:.1e}"


def test_attention_readme_rows_are_the_library_rows():
    """``readme_rows`` (what the README table is checked against) restate the raw rows."""
    data = _results("attention_deviation.json")
    bs, dtype = data["block_size"], data["readme_dtype"]
    impl_of = {
        "standard": ("standard", None),
        "sdpa-math": ("sdpa-math", None),
        "sdpa-flash": ("sdpa-flash", None),
        f"flash-style, block {bs}": ("flash-style", bs),
        "flash-style, bf16 running state": ("flash-style-lowacc", bs),
    }
    raw = {(r["impl"], r["dtype"], r["seq_len"], r["block_size"]): r for r in data["rows"]}
    assert data["readme_rows"]
    for row in data["readme_rows"]:
        for header, (impl, block) in impl_of.items():
            assert row[header] == _attention_cell(raw[(impl, dtype, row["seq_len"], block)])


def test_attention_ratio_prose_matches_its_json():
    """The flash-style / standard ratios quoted under the attention table."""
    text = _all_text()
    data = _results("attention_deviation.json")
    fl = [r["mean_ratio"] for r in data["ratios_bf16"]]
    low = [r["mean_ratio"] for r in data["ratios_bf16_lowacc"]]
    m = re.search(r"mean deviation at bf16 is (\d+\.\d+)–(\d+\.\d+) \((\d+) → (\d+) tokens\)", text)
    assert m, "the attention ratio sentence is gone: update this test"
    assert (m.group(1), m.group(2)) == (f"{min(fl):.2f}", f"{max(fl):.2f}")
    lens = [r["seq_len"] for r in data["ratios_bf16"]]
    assert (int(m.group(3)), int(m.group(4))) == (min(lens), max(lens))
    m = re.search(
        r"the ratio (?:grows|shrinks|goes) with length from (\d+\.\d+) to (\d+\.\d+)", text
    )
    assert m, "the bf16-running-state ratio sentence is gone: update this test"
    assert (m.group(1), m.group(2)) == (f"{low[0]:.2f}", f"{low[-1]:.2f}")
    fp32 = [r for r in data["rows"] if r["dtype"] == "fp32"]
    m = re.search(r"At fp32 the mean deviation is (\S+) to (\S+) \(every max below (\S+)\)", text)
    assert m and fp32, "the fp32 sentence (or the fp32 rows) is gone: update this test"
    means = [r["mean_abs_dev"] for r in fp32]
    assert (m.group(1), m.group(2)) == (f"{min(means):.1e}", f"{max(means):.1e}")
    assert max(r["max_abs_dev"] for r in fp32) < float(m.group(3))


def test_mixed_family_move_tables_match_the_json():
    """Each family's store size and move table under the compress_more table."""
    text = _all_text()
    families = _results("compress_more.json")["families"]
    mib = 2**20

    def bits(x: float) -> str:
        return f"{x:g}"

    for name, fam in families.items():
        head = re.search(rf"Family `{re.escape(name)}` \([^)]*\): one store of ([\d.]+) MiB", text)
        assert head, f"the docs have no move table for family {name!r}"
        assert head.group(1) == f"{fam['store_bytes'] / mib:.1f}"
        table = text[head.end() :].split("\n\n", 2)[1]
        rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
        want = [
            f"| {bits(mv['from'])} → {bits(mv['to'])} | {mv['layers']} | {mv['bytes'] / mib:.2f} MiB |"
            for mv in fam["moves"]
        ]
        assert rows == want, f"family {name!r}: the page's rows differ from compress_more.json"


def test_kernel_prose_matches_the_kernels_json():
    """The slow-down with fp32 activations and the probes' bf16 speed-ups quoted above the table."""
    text = _all_text()
    data = _results("kernels.json")
    fp32_x = [r["kernel_fp32_x"] for r in data["table"]]
    m = re.search(r"are (\d+)–(\d+)x \*slower\* than fp32 `F.linear` with fp32 activations", text)
    assert m, "the kernels' fp32-activation sentence is gone: update this test"
    assert (int(m.group(1)), int(m.group(2))) == (round(1 / max(fp32_x)), round(1 / min(fp32_x)))
    for kernel in ("cpu-int8", "cpu-int4"):
        probe = data["compute_dtype"][kernel]
        m = re.search(rf"{kernel} ([\d.]+)x", text)
        assert m and probe["dtype"] == "bf16", f"no probe figure for {kernel} in the docs"
        assert m.group(1) == f"{probe['fp32_s'] / probe['bf16_s']:.1f}"


@pytest.mark.parametrize("page", ["README.md", "docs/results/deploy.md"])
def test_deploy_block_is_what_the_script_prints(page, bench_script):
    """The headline table and its three summary lines are ``benchmarks/deploy.py --table``'s output."""
    block = bench_script("deploy").markdown(_results("deploy.json"))
    assert block in (ROOT / page).read_text(), f"{page}: run `python benchmarks/deploy.py --table`"


def test_deploy_headline_lines_are_its_json():
    """The headline verdicts under the deploy table (joules' best file of a size class against
    llama.cpp's best imatrix file of that size) are the ones the JSON holds, in both pages."""
    lines = _results("deploy.json")["headline"]
    assert lines, "the deploy JSON has no headline"
    for page in (ROOT / "README.md", ROOT / "docs/results/deploy.md"):
        text = page.read_text()
        for line in lines:
            assert f"- {line}" in text, f"{page.name}: no headline line {line!r}"


def test_published_gpu_table_is_what_the_script_prints(bench_script):
    """The published-figures table on the predict results page (no marker: its "weights" column
    joins two fields) is the first table ``benchmarks/predict_validation.py --markdown`` prints."""
    out = _results("predict_validation.json")
    table = bench_script("predict_validation").markdown(out).split("\n\n")[0]
    assert len(table.splitlines()) == 2 + len(out["published"])
    assert table in (ROOT / "docs/results/predict.md").read_text()


def test_kv_bytes_table_is_the_library_figure():
    """KV bytes per token of the default model's shape, per KV format (docs/compress.md)."""
    from types import SimpleNamespace

    from joules.compress.steps.kvcache import KVSettings, kv_bytes_per_token

    text = (ROOT / "docs/compress.md").read_text()
    rows = re.findall(r"^\| (fp16 \(no format\)|[\w-]+) \| ([\d,]+) \| ([\d.]+) \|$", text, re.M)
    assert len(rows) == 7, "the KV bytes table changed: update this test"
    config = SimpleNamespace(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30
    )
    fp16 = kv_bytes_per_token(KVSettings(), config)
    for fmt, nbytes, ratio in rows:
        s = KVSettings(
            format="none" if fmt.startswith("fp16") else fmt, granularity="kivi", group=32
        )
        got = kv_bytes_per_token(s, config)
        assert f"{got:,.0f}" == nbytes and f"{got / fp16:.2f}" == ratio, (fmt, got)


def test_deploy_above_grid_block_is_what_the_script_prints(bench_script):
    """The presets at and above the Q4_1 grid: their own JSON and table on the deploy page."""
    data = _results("deploy_above_grid.json")
    block = bench_script("deploy").markdown(data, "deploy_above_grid.json")
    page = (ROOT / "docs/results/deploy.md").read_text()
    assert block in page, (
        "run `python benchmarks/deploy.py --table --out results/deploy_above_grid.json`"
    )
    rows = {r["row"]: r for r in data["rows"]}
    for r in rows.values():  # every row is at or above the grid: nothing is claimed from them
        assert r["size_bytes"] >= data["q4_1_grid_bytes"] and not r["below_q4_1_grid"]
    for row in (r for r in rows if r.startswith("rtn-")):  # the path check, as the page says
        peer = rows["llamacpp-" + row.removeprefix("rtn-")]
        assert rows[row]["kld_mean"] == peer["kld_mean"] and rows[row]["types"] == peer["types"]
