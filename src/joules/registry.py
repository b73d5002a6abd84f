"""One registry for every named extension point: steps, tasks, runtimes, formats, kernels, hooks.

    >>> from joules.registry import Registry
    >>> colours = Registry[str]("colour")
    >>> @colours.register("red")
    ... def red() -> str:
    ...     return "#f00"
    >>> colours.get("red")()
    '#f00'
    >>> colours.names()
    ['red']
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    joules.errors.ConfigError: unknown colour 'blue': valid colours are red

Families whose members are named by a pattern (``int4-g64``, ``int8-g128``...) register one
entry with a template; ``get`` parses the fields (digits become ``int``) and calls the factory:

    >>> widths = Registry[object]("width")
    >>> _ = widths.register_pattern("int{bits}-g{group}", lambda bits, group: (bits, group))
    >>> widths.get("int4-g64")
    (4, 64)

Why one class: every registry used to be a hand-rolled dict, each with its own duplicate rule
(raise, silently replace, or keep both) and its own "unknown name" sentence. Here a name taken
by a *different* definition raises :class:`~joules.errors.ConfigError` (two plugins cannot
silently shadow each other), re-registering the same definition (a module imported or reloaded
twice) replaces it, and every unknown name gets the same one-line error naming the valid ones.
The idea follows lm-evaluation-harness's ``lm_eval/api/registry.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from joules.errors import ConfigError

T = TypeVar("T")

# ``{name}`` in a template: a run of letters, digits, '_' or '.'; ``{name:regex}`` chooses.
_FIELD = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def compile_template(template: str) -> re.Pattern[str]:
    """``"int{bits}-g{group}"`` as a regex with one named group per field (literals escaped).

    >>> compile_template("int{bits}-g{group}").fullmatch("int4-g64").groupdict()
    {'bits': '4', 'group': '64'}
    """
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{m.group(2) or r'[A-Za-z0-9_.]+?'})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def _field_value(text: str | None) -> Any:
    return int(text) if text is not None and text.isdigit() else text


@dataclass(frozen=True)
class PatternEntry(Generic[T]):
    """A family of names: ``regex`` fullmatches a name, ``value`` builds or parses it."""

    label: str  # how the error message and ``patterns()`` show the family
    regex: re.Pattern[str]
    value: T


def _same_definition(a: Any, b: Any) -> bool:
    """The same object, or the same module-level definition executed again (a reload)."""
    if a is b:
        return True
    key = ("__module__", "__qualname__")
    return all(hasattr(x, k) for x in (a, b) for k in key) and all(
        getattr(a, k) == getattr(b, k) for k in key
    )


class Registry(Generic[T]):
    """Named entries of one kind, with one duplicate check and one unknown-name error.

    ``kind`` is the singular noun the error message uses ("compression step"), ``plural``
    its plural (default: ``kind + "s"``). ``load`` is called before every lookup and may import
    the modules that register the built-in entries (idempotent: imports are cached). ``shown``
    replaces the listing of valid names in the error message (a family with hundreds of valid
    names lists its presets); ``hint`` is appended to it in parentheses.
    """

    def __init__(
        self,
        kind: str,
        plural: str | None = None,
        *,
        load: Callable[[], None] | None = None,
        shown: Callable[[], list[str]] | None = None,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._load = load
        self._shown = shown
        self._hint = hint
        self._entries: dict[str, T] = {}
        self._patterns: list[PatternEntry[T]] = []

    # -- registration ----------------------------------------------------------------------------
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, value: T) -> T: ...

    def register(self, name: str, value: Any = ...) -> Any:
        """``@registry.register("name")`` on a class or function, or ``register("name", obj)``.

        A name taken by a different definition raises :class:`ConfigError`; the same
        definition again (a re-import) replaces the entry."""
        if value is ...:

            def deco(obj: T) -> T:
                self._add(name, obj)
                return obj

            return deco
        self._add(name, value)
        return value

    def _add(self, name: str, value: T) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
        old = self._entries.get(name)
        if old is not None and not _same_definition(old, value):
            raise ConfigError(
                f"{self.kind} {name!r} is registered twice ({_where(old)} and {_where(value)}): "
                "rename one"
            )
        self._entries[name] = value

    def register_pattern(
        self, pattern: str | re.Pattern[str], value: T, *, label: str | None = None
    ) -> T:
        """Register a family of names. ``pattern`` is a template (``"int{bits}-g{group}"``,
        ``{field:regex}`` to constrain a field) or a compiled regex; it must match a whole name.
        Exact names win over patterns; patterns are tried in registration order."""
        regex = compile_template(pattern) if isinstance(pattern, str) else pattern
        shown = label or (pattern if isinstance(pattern, str) else pattern.pattern)
        for p in self._patterns:
            if p.regex.pattern == regex.pattern and not _same_definition(p.value, value):
                raise ConfigError(
                    f"{self.kind} pattern {shown!r} is registered twice "
                    f"({_where(p.value)} and {_where(value)}): rename one"
                )
        self._patterns = [p for p in self._patterns if p.regex.pattern != regex.pattern]
        self._patterns.append(PatternEntry(shown, regex, value))
        return value

    def unregister(self, name: str) -> T | None:
        """Remove ``name`` (tests that register throwaway entries clean up with this)."""
        return self._entries.pop(name, None)

    # -- lookup ----------------------------------------------------------------------------------
    def _loaded(self) -> None:
        if self._load is not None:
            self._load()

    def match(self, name: str) -> tuple[T, re.Match[str]] | None:
        """The first pattern entry that matches the whole of ``name`` and its match, else None."""
        self._loaded()
        for p in self._patterns:
            m = p.regex.fullmatch(name)
            if m is not None:
                return p.value, m
        return None

    def get(self, name: str) -> T:
        """The entry registered as ``name``; for a pattern entry, ``value(**fields)`` with the
        fields parsed from ``name``. An unknown name raises :meth:`unknown`."""
        self._loaded()
        if name in self._entries:
            return self._entries[name]
        hit = self.match(name) if isinstance(name, str) else None
        if hit is None:
            raise self.unknown(name)
        factory, m = hit
        fields = {k: _field_value(v) for k, v in m.groupdict().items()}
        return factory(**fields)  # type: ignore[operator,no-any-return]

    def unknown(self, name: Any) -> ConfigError:
        """The one error for a name nothing here answers to: it names the valid ones."""
        self._loaded()
        shown = (
            self._shown()
            if self._shown is not None
            else [*self.names(sort=True), *(p.label for p in self._patterns)]
        )
        listing = ", ".join(shown) if shown else f"none (no {self.plural} are registered)"
        hint = f" ({self._hint})" if self._hint else ""
        return ConfigError(f"unknown {self.kind} {name!r}: valid {self.plural} are {listing}{hint}")

    def names(self, *, sort: bool = False) -> list[str]:
        """The exact names, in registration order (``sort=True``: alphabetical)."""
        self._loaded()
        return sorted(self._entries) if sort else list(self._entries)

    def patterns(self) -> list[str]:
        """The labels of the pattern entries, in registration order."""
        self._loaded()
        return [p.label for p in self._patterns]

    def items(self) -> list[tuple[str, T]]:
        self._loaded()
        return list(self._entries.items())

    def values(self) -> list[T]:
        self._loaded()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self._loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"Registry({self.kind!r}, {len(self._entries)} names, {len(self._patterns)} patterns)"
        )


def _where(obj: Any) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "name", None) or type(obj).__name__
    return f"{mod}.{qual}" if mod else str(qual)


__all__ = ["PatternEntry", "Registry", "compile_template"]
