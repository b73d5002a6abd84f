"""mixed: budget respected, no affordable upgrade, family moves rewrite only differing layers."""

from __future__ import annotations

import pytest
import torch

from joules.compress import (
    calibration_tokens,
    compress,
    compressed_linears,
    load_compressed,
    parse_recipe,
)
from joules.compress.solvers.knapsack import affordable_upgrades
from joules.compress.steps.mixed import switch_member
from joules.errors import ConfigError
from joules.models import tiny_model

CANDS = "[int3-g32, int4-g32, int8-g32]"


def _run(recipe):
    model, tok, _ = tiny_model("llama", seed=0)
    calib, info = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, recipe, calibration=calib, calibration_info=info)
    return model, tok, cm


def test_family_members_within_budget_without_affordable_upgrade():
    _, _, cm = _run(f"mixed(avg_bits=[3.5, 4.5, 6], candidates={CANDS})")
    fam = cm.manifest.runtime["mixed_family"]
    names = list(fam["options"])
    costs = [fam["options"][n]["costs"] for n in names]
    errors = [fam["options"][n]["errors"] for n in names]
    numel = cm.manifest.targeted_parameters
    prev = None
    for mem in fam["members"]:
        assert mem["bits_per_weight"] <= mem["avg_bits"]
        choice = [fam["candidates"].index(mem["choice"][n]) for n in names]
        budget = int(mem["avg_bits"] * numel)
        assert affordable_upgrades(choice, costs, errors, budget) == []
        uniform4 = sum(e[1] for e in errors)  # int4-g32 everywhere: 4.5 bits
        if mem["avg_bits"] >= 4.5:
            assert mem["error"] <= uniform4
        if prev is not None:
            assert mem["error"] <= prev
        prev = mem["error"]
    assert cm.manifest.bits_per_weight == pytest.approx(fam["members"][0]["bits_per_weight"])
    assert len(fam["moves"]) == 4


def test_switch_member_rewrites_only_differing_layers(tmp_path):
    _, tok, cm = _run(f"mixed(avg_bits=[4, 5], candidates={CANDS})")
    cm.save(tmp_path / "fam", tok)
    fam = cm.manifest.runtime["mixed_family"]
    m2, _, _ = load_compressed(tmp_path / "fam")
    moved = switch_member(m2, tmp_path / "fam", 5)
    move = next(m for m in fam["moves"] if m["from"] == 4.0 and m["to"] == 5.0)
    assert moved == {"layers": move["layers"], "bytes": move["bytes"]}
    assert moved["layers"] > 0
    want = fam["members"][1]["choice"]
    assert {n: lin.spec for n, lin in compressed_linears(m2).items()} == want
    direct, _, _ = _run(f"mixed(avg_bits=[5], candidates={CANDS})")
    ids, _ = calibration_tokens(tok, n=2, length=32, seed=7)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, direct(ids).logits)
    assert switch_member(m2, tmp_path / "fam", 5) == {"layers": 0, "bytes": 0}


@pytest.mark.parametrize("sens", ["fisher", "probe"])
def test_other_sensitivities_run(sens):
    _, _, cm = _run(f"mixed(avg_bits=4, candidates=[int3-g32, int8-g32], sensitivity={sens})")
    fam = cm.manifest.runtime["mixed_family"]
    assert fam["members"][0]["bits_per_weight"] <= 4
    assert any(e[0] > e[1] for e in (o["errors"] for o in fam["options"].values()))


def test_gptq_quantizer():
    _, _, cm = _run("mixed(avg_bits=4, candidates=[int3-g32, int4-g32], quantizer=gptq)")
    assert {v["method"] for v in cm.manifest.layers.values()} == {"mixed"}


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ("mixed(avg_bits=3, candidates=[int4-g32, int8-g32])", "below the smallest candidate"),
        ("mixed(avg_bits=4, candidates=[int4-g32])", "at least two candidates"),
        ("mixed(avg_bits=4, candidates=[int4-g32, int99])", "mixed"),
    ],
)
def test_bad_parameters(recipe, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(recipe)
    assert "\n" not in str(e.value)
