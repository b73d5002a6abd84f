"""Stale stores: a run done under another key of the same config is reported, re-run or reused."""

from __future__ import annotations

import dataclasses
from typing import Literal

from joules.compress import recipe as recipe_mod
from joules.compress.recipe import expand_recipe, parse_recipe
from joules.compress.steps.mixed import Mixed
from joules.sweep import Store, run_sweep
from joules.sweep.runner import key_env, stale_reasons
from joules.sweep.spec import parse_spec
from joules.testing.sweep import FakeStages

V1 = {"joules_code": "aaaa", "torch": "2.13.0"}
COMPUTE = {"device": "cpu", "arch": "x86_64", "cpu_flags": ["avx2"], "env": {}}


def _model(sha: str):
    return lambda spec: {"sha256": sha, "files": {"m.gguf": [10, sha]}}


def _sweep(spec, db, **kw):
    kw.setdefault("versions", V1)
    kw.setdefault("compute", COMPUTE)
    kw.setdefault("model_identity", _model("m1"))
    return run_sweep(spec, db, stages=FakeStages().stages(), **kw)


def test_new_code_makes_every_run_stale_reported_with_why_and_rerun(tmp_path, spec):
    db = tmp_path / "s.db"
    assert _sweep(spec, db).ran == 4
    s = _sweep(spec, db, versions={**V1, "joules_code": "bbbb"})
    assert (s.ran, s.skipped, s.failed) == (4, 0, 0)  # never "already done"
    assert len(s.stale_rerun) == 4 and not s.stale_reused
    for _, reasons in s.stale_rerun:
        assert reasons == ["code: the joules source changed (aaaa → bbbb)"]
    with Store(db) as st:
        current = st.runs()
        every = st.runs(include_superseded=True)
    assert len(current) == 4 and all(r.versions["joules_code"] == "bbbb" for r in current)
    old = [r for r in every if r.superseded_by]
    assert len(old) == 4 and {r.superseded_by for r in old} == {r.key for r in current}
    assert all(r.key_parts["versions"]["joules_code"] == "bbbb" for r in current)
    again = _sweep(spec, db, versions={**V1, "joules_code": "bbbb"})
    assert (again.ran, again.skipped, again.stale_rerun) == (0, 4, [])


def test_each_changed_component_is_named(tmp_path, spec):
    db = tmp_path / "s.db"
    _sweep(spec, db)
    s = _sweep(
        spec, db,
        versions={**V1, "torch": "2.14.0"},
        compute={**COMPUTE, "cpu_flags": ["avx2", "avx512_bf16"]},
        model_identity=_model("m2"),
    )  # fmt: skip
    reasons = s.stale_rerun[0][1]
    assert "versions: torch 2.13.0 → 2.14.0" in reasons
    assert any(r.startswith("model: the content of tiny changed (m.gguf)") for r in reasons)
    assert any(r.startswith("compute: cpu_flags") and "avx512_bf16" in r for r in reasons)
    assert not any(r.startswith("code") for r in reasons)


def test_reuse_stale_keeps_the_results_and_marks_them(tmp_path, spec):
    db = tmp_path / "s.db"
    _sweep(spec, db)
    new = {**V1, "joules_code": "cccc"}
    s = _sweep(spec, db, versions=new, reuse_stale=True)
    assert (s.ran, s.skipped) == (0, 4) and len(s.stale_reused) == 4 and not s.stale_rerun
    with Store(db) as st:
        runs = st.runs()
    assert len(runs) == 4
    assert all(r.stale == ["code: the joules source changed (aaaa → cccc)"] for r in runs)
    # without the flag the next sweep re-runs them, and the new rows carry no stale mark
    s2 = _sweep(spec, db, versions=new)
    assert s2.ran == 4 and len(s2.stale_rerun) == 4
    with Store(db) as st:
        runs = st.runs()
    assert len(runs) == 4 and all(r.stale is None and r.versions == new for r in runs)


def test_a_run_stored_before_keys_had_components_is_stale_with_a_reason(tmp_path, spec):
    db = tmp_path / "s.db"
    _sweep(spec, db)
    with Store(db) as st:  # as an older joules wrote it: another key scheme, versions only
        st.conn.execute("DELETE FROM metrics")
        st.conn.execute(
            "UPDATE runs SET key = 'old-' || key, key_parts_json = NULL, "
            """versions_json = '{"torch": "2.13.0"}'"""
        )
    s = _sweep(spec, db)
    assert s.ran == 4
    reasons = s.stale_rerun[0][1]
    assert reasons[0] == "code: stored before joules recorded its code fingerprint"
    assert any("stored by an older joules" in r for r in reasons)


def _mixed_with_default(monkeypatch, default: str) -> None:
    """Register ``mixed`` with another default ``sensitivity``, as an older joules had it."""

    @dataclasses.dataclass(kw_only=True)
    class OldMixed(Mixed):
        sensitivity: Literal["hessian", "fisher", "probe"] = default  # type: ignore[assignment]

    OldMixed.name = "mixed"
    monkeypatch.setitem(recipe_mod.STEPS._entries, "mixed", OldMixed)


def test_changing_a_step_default_changes_the_key_but_not_the_recipe_text(monkeypatch):
    text = 'models = ["m"]\nrecipes = ["mixed(avg_bits=4.25)"]\n[eval]\nlimit_tokens = 512\n'
    spec = parse_spec(text, check_models=False)
    kw = {"versions": V1, "compute": COMPUTE, "model_identity": _model("m1")}
    now = spec.runs()[0]
    key_now = now.key(key_env(spec, **kw))
    parts_now = now.key_parts(key_env(spec, **kw))
    _mixed_with_default(monkeypatch, "hessian")
    old_spec = parse_spec(text, check_models=False)
    old = old_spec.runs()[0]
    assert old.recipe == now.recipe  # the canonical text drops defaults: it cannot tell
    assert old.key(key_env(old_spec, **kw)) != key_now
    parts_old = old.key_parts(key_env(old_spec, **kw))
    assert stale_reasons(parts_old, {}, parts_now) == [
        "recipe defaults: mixed.sensitivity hessian → fisher"
    ]


def test_the_expanded_recipe_lists_every_field_of_every_step():
    steps = expand_recipe("awq(format=int4-g64) | gptq(format=int4-g64)")
    for step, cls_name in zip(steps, ("awq", "gptq"), strict=True):
        cls = recipe_mod.step_class(cls_name)
        assert step["name"] == cls_name
        assert set(step) == {"name"} | {f.name for f in dataclasses.fields(cls)}
    assert steps[1]["damp"] == 0.01 and steps[1]["act_order"] is True  # defaults, written out
    assert expand_recipe("baseline") == [] and parse_recipe("rtn(format=int8-ch)").expanded()


def test_undoing_a_change_makes_the_first_runs_current_again(tmp_path, spec):
    db = tmp_path / "s.db"
    _sweep(spec, db)
    _sweep(spec, db, versions={**V1, "joules_code": "bbbb"})
    back = _sweep(spec, db)  # the edit was reverted: the first results are current again
    assert (back.ran, back.skipped, back.stale_rerun) == (0, 4, [])
    with Store(db) as st:
        runs = st.runs()
        every = st.runs(include_superseded=True)
    assert len(runs) == 4 and all(r.versions == V1 and r.stale is None for r in runs)
    assert sum(r.superseded_by is not None for r in every) == 4
