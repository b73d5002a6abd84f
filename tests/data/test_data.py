import json

import pytest

from joules.data import ChoiceItem, load_choice, load_text
from joules.errors import DataError


def test_wikitext_splits_are_shipped_and_distinct():
    test, valid = load_text("wikitext2", "test"), load_text("wikitext2", "valid")
    # Merity et al. count 245,569 test and 217,646 valid tokens, one <eos> per line included.
    assert len(test.split()) + len(test.splitlines()) == 245_569
    assert len(valid.split()) + len(valid.splitlines()) == 217_646
    assert test != valid
    assert load_text("wikitext-2", "validation") == valid
    assert load_text("wikitext2") == test  # test is the default split


def test_missing_split_lists_the_available_ones():
    with pytest.raises(DataError, match="available splits are test, valid"):
        load_text("wikitext2", "train")


def test_hellaswag_has_10042_items_with_four_endings_and_labels_0_to_3():
    items = load_choice("hellaswag")
    assert len(items) == 10_042
    assert all(len(it.endings) == 4 for it in items)
    assert {it.label for it in items} == {0, 1, 2, 3}
    assert items[0].context.startswith("Roof shingle removal:")


def test_user_text_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello joules")
    assert load_text(str(f)) == "hello joules"
    with pytest.raises(DataError, match="no splits"):
        load_text(str(f), "test")
    with pytest.raises(DataError, match="no text data set or file"):
        load_text(str(tmp_path / "missing.txt"))


def test_user_jsonl(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [
        {"context": "2+2=", "endings": ["4", "5"], "label": 0},
        {"context": "x", "endings": ["a", "b", "c"], "label": 2},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_choice(str(f)) == [
        ChoiceItem("2+2=", ("4", "5"), 0),
        ChoiceItem("x", ("a", "b", "c"), 2),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"context": "a", "endings": ["b", "c"]}', "line 2: each line needs keys"),
        ('{"context": "a", "endings": ["b", "c"], "label": 5}', "line 2: label 5"),
        ('{"context": "a", "endings": "bc", "label": 0}', "line 2: context must be a string"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "ok", "endings": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_choice(str(f))


def test_licenses_name_only_files_that_are_shipped():
    """Every path in the first column of data/LICENSES.md's tables exists in joules.data."""
    import re
    from importlib import resources

    root = resources.files("joules.data")
    text = root.joinpath("LICENSES.md").read_text()
    paths = [
        p
        for line in text.splitlines()
        if line.startswith("| `")
        for p in re.findall(r"`([^`]+)`", line.split("|")[1])
    ]
    assert len(paths) >= 5
    missing = [p for p in paths if not root.joinpath(p).is_file()]
    assert not missing, f"LICENSES.md names files that do not exist: {missing}"


def test_hellaswag_strings_go_through_lm_evals_preprocess():
    from joules.data import hellaswag_preprocess

    raw, done = load_choice("hellaswag", preprocess=False), load_choice("hellaswag")
    import re

    # the shipped text keeps WikiHow's bracketed artefacts ("[insert name]") in a few strings
    def bracketed(items):
        return sum(
            bool(re.search(r"\[.*?\]", s)) for it in items for s in (it.context, *it.endings)
        )

    assert bracketed(raw) >= 10 and bracketed(done) == 0
    for a, b in zip(raw, done, strict=True):
        assert b.context == hellaswag_preprocess(a.context) and b.label == a.label
        assert b.endings == tuple(hellaswag_preprocess(e) for e in a.endings)
    assert hellaswag_preprocess(" How to cook [title] Boil water [step] then  wait. ") == (
        "How to cook. Boil water then wait."
    )
