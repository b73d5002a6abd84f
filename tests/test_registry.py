"""The one registry: one duplicate check, one unknown-name message, pattern-keyed families."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError
from joules.registry import Registry, compile_template


def test_register_get_names_and_iteration() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.get("b") == 2 and reg.get("a") is a
    assert reg.names() == ["b", "a"] and reg.names(sort=True) == ["a", "b"]
    assert list(reg) == ["b", "a"] and len(reg) == 2 and "a" in reg and "c" not in reg
    assert reg.values() == [2, a] and reg.items() == [("b", 2), ("a", a)]
    assert reg.unregister("b") == 2 and reg.names() == ["a"]


def test_a_name_taken_by_another_definition_is_refused() -> None:
    reg: Registry[object] = Registry("widget")

    class One:
        pass

    class Two:
        pass

    reg.register("w", One)
    reg.register("w", One)  # the same definition again (a re-import) is fine
    with pytest.raises(ConfigError, match=r"widget 'w' is registered twice .*One and .*Two"):
        reg.register("w", Two)
    assert reg.get("w") is One


def test_unknown_names_get_one_message_naming_the_valid_ones() -> None:
    reg: Registry[int] = Registry("widget", hint="see `joules widgets`")
    reg.register("zeta", 1)
    reg.register("alpha", 2)
    reg.register_pattern("w{n}", lambda n: n)
    with pytest.raises(ConfigError) as e:
        reg.get("beta")
    assert str(e.value) == (
        "unknown widget 'beta': valid widgets are alpha, zeta, w{n} (see `joules widgets`)"
    )
    empty: Registry[int] = Registry("gadget")
    with pytest.raises(ConfigError, match="valid gadgets are none"):
        empty.get("x")


def test_patterns_parse_their_fields() -> None:
    reg: Registry[object] = Registry("format")
    reg.register_pattern("int{bits}-g{group}", lambda bits, group: ("int", bits, group))
    reg.register_pattern("fp{bits}-{element:e\\dm\\d}", lambda bits, element: (bits, element))
    reg.register("int4-g64", "exact")  # exact names win over patterns
    assert reg.get("int8-g128") == ("int", 8, 128)
    assert reg.get("int4-g64") == "exact"
    assert reg.get("fp8-e4m3") == (8, "e4m3")
    with pytest.raises(ConfigError, match="unknown format 'fp8-x'"):
        reg.get("fp8-x")  # the field's own regex rejects it
    _, m = reg.match("int3-g32")
    assert (
        m.groupdict() == {"bits": "3", "group": "32"} and reg.patterns()[0] == "int{bits}-g{group}"
    )
    assert compile_template("a.{x}").fullmatch("aXb") is None  # literals are escaped


def test_a_pattern_taken_by_another_factory_is_refused() -> None:
    reg: Registry[object] = Registry("format")
    reg.register_pattern("q{n}", int)
    with pytest.raises(ConfigError, match=r"pattern 'q\{n\}' is registered twice"):
        reg.register_pattern("q{n}", float)


def test_load_runs_before_lookups() -> None:
    calls = []
    reg: Registry[int] = Registry("step", load=lambda: calls.append(1))
    reg.names()
    reg.get("x") if "x" in reg else None
    assert len(calls) >= 2


def test_the_migrated_registries_share_the_message() -> None:
    from joules.bench.runtimes import get_runtime
    from joules.compress.modules.kernels import compute_dtype
    from joules.compress.modules.linear import module_class
    from joules.compress.recipe import step_class
    from joules.evaluate.tasks import task_class

    for lookup, kind in [
        (step_class, "compression step"),
        (task_class, "task"),
        (get_runtime, "runtime"),
        (compute_dtype, "kernel"),
        (module_class, "compressed module type"),
    ]:
        with pytest.raises(ConfigError, match=f"^unknown {kind} 'nope': valid .* are "):
            lookup("nope")
