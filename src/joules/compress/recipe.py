"""Recipes: an ordered list of compression steps, each a registered ``@dataclass`` config.

    >>> from joules.compress import parse_recipe
    >>> r = parse_recipe("rtn(format=int8-ch)")
    >>> r.steps[0].format, r.to_string()
    ('int8-ch', 'rtn(format=int8-ch)')
    >>> parse_recipe(r.to_string()) == r
    True

Grammar: steps joined by ``|``; each step is ``name(key=value, ...)`` with keyword arguments
only. Values are ``true``/``false``, integers, floats, lists ``[3.5, 4]``, or bare (or quoted)
strings. A recipe file is TOML with one ``[[step]]`` table per step (``name = "gptq"`` plus the
step's keys). ``baseline`` (or an empty string) is the empty recipe: the model as loaded.

A step is a ``@dataclass(kw_only=True)`` subclass of :class:`Step` registered with
:func:`register_step`; it implements ``apply(ctx)``. Steps never call each other: the shared
machinery (targets, calibration, block-by-block execution, Hessians) lives in
:mod:`joules.compress.context` and :mod:`joules.compress.solvers.hessian`.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from joules.errors import ConfigError
from joules.registry import Registry


def _load_builtin_steps() -> None:
    # Importing the package registers every built-in step.
    import joules.compress  # noqa: F401


STEPS: Registry[type[Step]] = Registry("compression step", load=_load_builtin_steps)


@dataclass(kw_only=True)
class Step:
    """Base of every compression step config.

    ``targets``: glob patterns on module names (``fnmatch``); empty means the step's default
    (every ``nn.Linear`` inside the decoder blocks). ``lm_head`` and embeddings are compressed
    only when a pattern names them.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # Runs layer by layer (joules.compress.offload): the step reads weights only through
    # ``ctx.sequential`` / ``ctx.each_target``, one decoder block at a time. A step that needs
    # the whole model at once leaves this False and is refused on that path.
    layered: ClassVar[bool] = False
    targets: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check parameter values; raise :class:`ConfigError` naming the key and valid range."""

    def apply(self, ctx: Any) -> None:  # pragma: no cover - every step overrides
        raise NotImplementedError

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_string(self) -> str:
        """``name(k=v, ...)`` with the keys that differ from their defaults."""
        args = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                default = object()
            if v != default:
                args.append(f"{f.name}={_format_value(v)}")
        return f"{self.name}({', '.join(args)})"


def register_step(name: str) -> Callable[[type[Step]], type[Step]]:
    """Register a step config class under ``name`` (the word used in recipes)."""

    def deco(cls: type[Step]) -> type[Step]:
        STEPS.register(name, cls)
        cls.name = name
        return cls

    return deco


def step_names() -> list[str]:
    """Every registered step name, sorted."""
    return STEPS.names(sort=True)


def step_class(name: str) -> type[Step]:
    return STEPS.get(name)


@dataclass
class Recipe:
    """An ordered list of steps; empty is the baseline (the model as loaded)."""

    steps: list[Step] = dataclasses.field(default_factory=list)

    def to_string(self) -> str:
        return " | ".join(s.to_string() for s in self.steps) if self.steps else "baseline"

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    def expanded(self) -> list[dict[str, Any]]:
        """Every step with every field of its config and its value, defaults included.

        What keys hash (:func:`expand_recipe`): :meth:`to_string` drops defaults, so a changed
        default (``mixed``'s ``sensitivity``) would leave the string, and a key made from it,
        as they were while the numbers change."""
        out = []
        for step in self.steps:
            d: dict[str, Any] = {"name": step.name}
            for f in dataclasses.fields(step):
                d[f.name] = _plain(getattr(step, f.name))
            out.append(d)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Recipe:
        return Recipe(
            [build_step(dict(s), where=f"step {i + 1}") for i, s in enumerate(d["steps"])]
        )

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    def __str__(self) -> str:
        return self.to_string()


def _plain(v: Any) -> Any:
    """A field value as plain JSON (tuples as lists, nested dataclasses as dicts)."""
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return v


def expand_recipe(text: str | Path | Recipe) -> list[dict[str, Any]]:
    """The canonical form keys use: every step, every field, defaults expanded (``[]`` for the
    baseline).

    >>> expand_recipe("rtn(format=int8-ch)")
    [{'name': 'rtn', 'targets': [], 'format': 'int8-ch'}]
    """
    return parse_recipe(text).expanded()


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def parse_recipe(text: str | Path | Recipe) -> Recipe:
    """A :class:`Recipe` from a recipe string, a TOML file path, or a Recipe (returned as is)."""
    if isinstance(text, Recipe):
        return text
    if isinstance(text, Path) or (isinstance(text, str) and text.strip().endswith(".toml")):
        return _parse_toml(Path(text))
    s = str(text).strip()
    if s in ("", "baseline", "none"):
        return Recipe([])
    steps = []
    for i, part in enumerate(_split_top(s, "|")):
        steps.append(_parse_step(part.strip(), i + 1))
    return Recipe(steps)


_STEP_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?$", re.S)


def _parse_step(text: str, index: int) -> Step:
    where = f"step {index} '{text}'"
    m = _STEP_RE.match(text)
    if not m:
        raise ConfigError(
            f"cannot read {where}: write name(key=value, ...), e.g. 'gptq(format=int4-g64)', "
            "steps joined by '|'"
        )
    name, body = m.group(1), (m.group(2) or "").strip()
    kwargs: dict[str, Any] = {}
    for arg in _split_top(body, ",") if body else []:
        arg = arg.strip()
        if not arg:
            continue
        if "=" not in arg:
            raise ConfigError(
                f"{where}: '{arg}' is positional; steps take keyword arguments only (key=value)"
            )
        key, val = arg.split("=", 1)
        key = key.strip()
        if key in kwargs:
            raise ConfigError(f"{where}: key '{key}' is given twice")
        kwargs[key] = _parse_value(val.strip())
    return build_step({"name": name, **kwargs}, where=where)


def _parse_toml(path: Path) -> Recipe:
    if not path.is_file():
        raise ConfigError(f"no recipe file at '{path}': pass a recipe string or a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe file '{path}' is not valid TOML: {exc}") from exc
    unknown = set(data) - {"step"}
    if unknown:
        raise ConfigError(
            f"recipe file '{path}': unknown top-level key '{sorted(unknown)[0]}'; "
            "write one [[step]] table per step"
        )
    steps = data.get("step", [])
    if not isinstance(steps, list):
        raise ConfigError(f"recipe file '{path}': 'step' must be an array of tables ([[step]])")
    return Recipe(
        [build_step(dict(s), where=f"{path.name} step {i + 1}") for i, s in enumerate(steps)]
    )


def build_step(d: dict[str, Any], where: str = "step") -> Step:
    """A step from ``{"name": ..., key: value}``, with types checked against its fields."""
    if "name" not in d:
        raise ConfigError(f"{where}: missing 'name' (one of {', '.join(step_names())})")
    cls = step_class(str(d.pop("name")))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, val in d.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: {cls.name} has no key '{key}': valid keys are {', '.join(fields)}"
            )
        kw[key] = _coerce(val, hints[key], f"{where}: {cls.name}.{key}")
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kw
    ]
    if missing:
        raise ConfigError(
            f"{where}: {cls.name} needs '{missing[0]}' (e.g. {cls.name}({missing[0]}=...))"
        )
    step = cls(**kw)
    step.validate()
    return step


def _coerce(val: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if val is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(val, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {val!r}")
    if origin is tuple:
        items = val if isinstance(val, list | tuple) else [val]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in items)
    if origin is typing.Literal:
        if val not in args:
            raise ConfigError(f"{where} = {val!r}: valid values are {', '.join(map(str, args))}")
        return val
    if hint is bool:
        if isinstance(val, bool):
            return val
        raise ConfigError(f"{where} = {val!r}: expected true or false")
    if hint is int:
        if isinstance(val, int) and not isinstance(val, bool):
            return val
        raise ConfigError(f"{where} = {val!r}: expected an integer")
    if hint is float:
        if isinstance(val, int | float) and not isinstance(val, bool):
            return float(val)
        raise ConfigError(f"{where} = {val!r}: expected a number")
    if hint is str:
        if isinstance(val, str):
            return val
        if isinstance(val, int | float) and not isinstance(val, bool):
            return str(val)
        raise ConfigError(f"{where} = {val!r}: expected a string")
    return val


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, parentheses and quotes."""
    out, depth, quote, cur = [], 0, "", []
    for ch in s:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise ConfigError(f"unbalanced brackets or quotes in recipe '{s}'")
    out.append("".join(cur))
    return out


def _parse_value(v: str) -> Any:
    if v.startswith("[") and v.endswith("]"):
        inner = v[1:-1].strip()
        return [_parse_value(x.strip()) for x in _split_top(inner, ",")] if inner else []
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_format_value(x) for x in v) + "]"
    if isinstance(v, str) and re.search(r"[\s,|()\[\]=\"']", v):
        return '"' + v + '"'
    if v is None:
        return "none"
    return str(v)
