"""Evaluation data shipped inside joules, and loaders for a user's own files.

    >>> from joules.data import load_text, load_choice
    >>> text = load_text("wikitext2", "test")        # WikiText-2 test split, as one string
    >>> len(load_choice("hellaswag"))                 # HellaSwag validation
    10042
    >>> load_text("notes.txt")                        # any UTF-8 text file  # doctest: +SKIP
    >>> load_choice("mine.jsonl")                     # {"context", "endings", "label"} per line  # doctest: +SKIP

Calibrate on ``valid``, evaluate on ``test``. Sources and licences: ``LICENSES.md`` beside this
file (WikiText-2: CC BY-SA 3.0; HellaSwag: MIT).

HellaSwag is shipped as llama.cpp's text file (``activity_label: ctx_a ctx_b`` and 4 endings per
item). ``load_choice("hellaswag")`` applies lm-evaluation-harness's ``preprocess`` (below) to
every context and ending; lm-eval's exact text cannot be rebuilt from this file, because it does
not mark where ``ctx_a`` ends, so ``ctx_b`` is not capitalised as lm-eval does.
"""

from __future__ import annotations

import bz2
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from joules.errors import DataError

_TEXT_SETS = {"wikitext2": {"test": "wikitext2/test.txt", "valid": "wikitext2/valid.txt"}}
_CHOICE_SETS = {"hellaswag": {"validation": "hellaswag/hellaswag_val.txt.bz2"}}
_ALIASES = {"wikitext-2": "wikitext2", "wikitext": "wikitext2"}
_SPLIT_ALIASES = {"validation": "valid", "valid": "validation", "val": "valid"}


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: a context, its candidate endings and the correct index."""

    context: str
    endings: tuple[str, ...]
    label: int


def text_sets() -> dict[str, list[str]]:
    """The shipped text data sets and their splits."""
    return {name: list(splits) for name, splits in _TEXT_SETS.items()}


def choice_sets() -> dict[str, list[str]]:
    """The shipped multiple-choice data sets and their splits."""
    return {name: list(splits) for name, splits in _CHOICE_SETS.items()}


def _shipped(rel: str) -> Path:
    return Path(str(resources.files("joules.data").joinpath(rel)))


def _pick(sets: dict[str, dict[str, str]], name: str, split: str | None, kind: str) -> Path | None:
    """The shipped file for (name, split), None if ``name`` is not a shipped set."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in sets:
        return None
    splits = sets[key]
    if split is None:
        return _shipped(next(iter(splits.values())))
    for candidate in (split.lower(), _SPLIT_ALIASES.get(split.lower(), "")):
        if candidate in splits:
            return _shipped(splits[candidate])
    raise DataError(
        f"{kind} data set {name!r} has no split {split!r}: available splits are "
        + ", ".join(splits)
    )


@functools.lru_cache(maxsize=8)
def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def load_text(name: str, split: str | None = None) -> str:
    """Return a text corpus as one string: a shipped set (``wikitext2``) or a text file path.

    For ``wikitext2`` the split defaults to ``test``; ``valid`` is for calibration.
    """
    path = _pick(_TEXT_SETS, name, split, "text")
    if path is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(
                f"no text data set or file {name!r}: use one of {', '.join(_TEXT_SETS)} "
                "or the path of a UTF-8 text file"
            )
        if split is not None:
            raise DataError(f"{name!r} is a file: it has no splits (drop split={split!r})")
    try:
        return _read_text(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag ``preprocess`` (tasks/hellaswag/utils.py), verbatim rules.

    Strips, turns WikiHow's `` [title]`` into ``". "``, drops other bracketed artefacts and one
    level of double spaces.
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _parse_hellaswag(raw: str, source: str, preprocess: bool = True) -> list[ChoiceItem]:
    lines = raw.splitlines()
    if len(lines) % 6:
        raise DataError(f"{source}: expected 6 lines per item, got {len(lines)} lines in total")
    items = []
    for i in range(0, len(lines), 6):
        try:
            label = int(lines[i + 1])
        except ValueError as exc:
            raise DataError(f"{source} line {i + 2}: label {lines[i + 1]!r} is not 0-3") from exc
        context, endings = lines[i], lines[i + 2 : i + 6]
        if preprocess:
            context, endings = (
                hellaswag_preprocess(context),
                [hellaswag_preprocess(e) for e in endings],
            )
        items.append(ChoiceItem(context, tuple(endings), label))
    return items


def _parse_jsonl(path: Path) -> list[ChoiceItem]:
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                context, endings, label = rec["context"], rec["endings"], rec["label"]
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg})") from exc
            except (KeyError, TypeError) as exc:
                raise DataError(
                    f"{path} line {n}: each line needs keys context, endings, label"
                ) from exc
            if not isinstance(context, str) or not isinstance(endings, list) or len(endings) < 2:
                raise DataError(
                    f"{path} line {n}: context must be a string and endings a list of 2+ strings"
                )
            if not isinstance(label, int) or not 0 <= label < len(endings):
                raise DataError(
                    f"{path} line {n}: label {label!r} is not an index into its "
                    f"{len(endings)} endings"
                )
            items.append(ChoiceItem(context, tuple(str(e) for e in endings), label))
    if not items:
        raise DataError(f"{path} holds no items")
    return items


@functools.lru_cache(maxsize=4)
def _load_choice_cached(path: Path, kind: str, preprocess: bool) -> tuple[ChoiceItem, ...]:
    if kind == "hellaswag":
        raw = bz2.decompress(path.read_bytes()).decode("utf-8")
        return tuple(_parse_hellaswag(raw, path.name, preprocess))
    return tuple(_parse_jsonl(path))


def load_choice(
    name: str, split: str | None = None, *, preprocess: bool = True
) -> list[ChoiceItem]:
    """Return multiple-choice items: a shipped set (``hellaswag``) or a JSONL file path.

    A JSONL file has one object per line: ``{"context": str, "endings": [str, ...], "label": int}``
    and is used as given. The shipped HellaSwag goes through :func:`hellaswag_preprocess` unless
    ``preprocess=False`` (the file's own text).
    """
    path = _pick(_CHOICE_SETS, name, split, "multiple-choice")
    if path is not None:
        return list(_load_choice_cached(path, "hellaswag", preprocess))
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(
            f"no multiple-choice data set or file {name!r}: use one of "
            f"{', '.join(_CHOICE_SETS)} or the path of a JSONL file"
        )
    return list(_load_choice_cached(path.resolve(), "jsonl", False))


__all__ = [
    "ChoiceItem",
    "choice_sets",
    "hellaswag_preprocess",
    "load_choice",
    "load_text",
    "text_sets",
]
