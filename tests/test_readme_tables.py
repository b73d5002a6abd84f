"""Every README table that cites a benchmark's results JSON matches the committed file.

A table is tied to its JSON by a marker comment on the line before it:

    <!-- bench: results/NAME.json rows=PATH key=FIELD cols=HEADER=FIELD; HEADER=FIELD*100 -->

* ``results/NAME.json`` is relative to ``bench/`` (the file a benchmark wrote and we committed);
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
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*bench:\s*(?P<file>\S+)\s+(?P<opts>.*?)\s*-->")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.(\d+))?")


def _marked_tables(text: str) -> list[tuple[dict[str, Any], list[str], list[list[str]], int]]:
    """(marker options, header, rows, line number) of each marked table."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
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
        assert len(body) >= 3, f"README line {i + 1}: a bench marker must precede a table"
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


TABLES = _marked_tables(README.read_text())


def test_readme_has_bench_tables():
    assert len(TABLES) >= 4


@pytest.mark.parametrize(
    ("opts", "header", "rows", "line"), TABLES, ids=[f"line{t[3]}" for t in TABLES]
)
def test_table_rows_match_the_committed_json(opts, header, rows, line):
    path = ROOT / "bench" / opts["file"]
    assert path.is_file(), f"README line {line} cites {path}, which is not committed"
    data = json.loads(path.read_text())
    assert "command" in data and "machine" in data, f"{path.name}: no command/machine recorded"
    assert "cpu_flags" in data["machine"], f"{path.name}: machine has no CPU flags"
    objs = _get(data, opts["rows"])
    keys = opts["key"].split(",")
    nk = len(keys)
    cols = opts.get("cols", {})
    unmapped = [h for h in header[nk:] if h not in cols]
    assert not unmapped, f"README line {line}: columns {unmapped} map to no JSON field"
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
    assert not problems, f"README line {line} vs {opts['file']}:\n" + "\n".join(problems)


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
    text = README.read_text()
    m = re.search(r"gain \+([\d.]+) dB over MXFP4 for ([\d.]+) more bits", text)
    assert m, "the NxFP sentence is gone: update this test"
    res = {
        r["format"]: r
        for r in json.loads((ROOT / "bench/results/formats_compare.json").read_text())["results"]
    }
    gain = res["nxfp4"]["sqnr_db"] - res["mxfp4"]["sqnr_db"]
    bits = res["nxfp4"]["bits_per_element"] - res["mxfp4"]["bits_per_element"]
    assert f"{gain:.2f}" == m.group(1) and f"{bits:.3f}" == m.group(2)


def test_estimator_constants_quoted_in_the_readme():
    """±30 %, 0.375 W per GiB and 30 % of TDP at idle are the code's and data's values."""
    from joules.measure.carbon import hardware_table
    from joules.measure.estimate import ESTIMATE_RELATIVE_UNCERTAINTY

    text = README.read_text()
    table = hardware_table()
    assert ESTIMATE_RELATIVE_UNCERTAINTY == 0.30 and "±30 % band" in text
    assert table["memory"]["w_per_gib"] == 0.375 and "0.375 W per GiB" in text
    assert table["cpu_defaults"]["idle_fraction"] == 0.3 and "30 % of TDP at idle" in text


def _results(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def test_fit_columns_peer_sentence_matches_its_json():
    """The rank-1 update time quoted above the fit-columns table is the same run's peer."""
    text = README.read_text()
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
    text = README.read_text()
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
    text = README.read_text()
    families = _results("compress_more.json")["families"]
    mib = 2**20

    def bits(x: float) -> str:
        return f"{x:g}"

    for name, fam in families.items():
        head = re.search(rf"Family `{re.escape(name)}` \([^)]*\): one store of ([\d.]+) MiB", text)
        assert head, f"README has no move table for family {name!r}"
        assert head.group(1) == f"{fam['store_bytes'] / mib:.1f}"
        table = text[head.end() :].split("\n\n", 2)[1]
        rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
        want = [
            f"| {bits(mv['from'])} → {bits(mv['to'])} | {mv['layers']} | {mv['bytes'] / mib:.2f} MiB |"
            for mv in fam["moves"]
        ]
        assert rows == want, f"family {name!r}: README rows differ from compress_more.json"


def test_kernel_prose_matches_the_kernels_json():
    """The slow-down with fp32 activations and the probes' bf16 speed-ups quoted above the table."""
    text = README.read_text()
    data = _results("kernels.json")
    fp32_x = [r["kernel_fp32_x"] for r in data["table"]]
    m = re.search(r"are (\d+)–(\d+)x \*slower\* than fp32 `F.linear` with fp32 activations", text)
    assert m, "the kernels' fp32-activation sentence is gone: update this test"
    assert (int(m.group(1)), int(m.group(2))) == (round(1 / max(fp32_x)), round(1 / min(fp32_x)))
    for kernel in ("cpu-int8", "cpu-int4"):
        probe = data["compute_dtype"][kernel]
        m = re.search(rf"{kernel} ([\d.]+)x", text)
        assert m and probe["dtype"] == "bf16", f"no probe figure for {kernel} in the README"
        assert m.group(1) == f"{probe['fp32_s'] / probe['bf16_s']:.1f}"
