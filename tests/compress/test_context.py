"""CompressContext's grouping of targets by decoder block."""

from __future__ import annotations

import pytest
from torch import nn

from joules.compress.context import CompressContext
from joules.errors import ConfigError
from joules.models import tiny_model


def test_targets_group_by_block_under_their_names_inside_it():
    model, tok, _ = tiny_model("llama", seed=0)
    ctx = CompressContext(model, tok)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups, outside = ctx.split_by_block(targets)
    assert list(outside) == ["lm_head"]
    assert sorted(groups) == list(range(len(ctx.layers)))
    for i, mods in groups.items():
        for rel, m in mods.items():
            assert targets[f"{ctx.layers_name}.{i}.{rel}"] is m
    assert "mlp.up_proj" in groups[0]
    with pytest.raises(ConfigError, match="not 'lm_head'"):
        ctx.by_block(targets, "step targets block linears, not '{name}'")
    inside = {n: m for n, m in targets.items() if n != "lm_head"}
    assert ctx.by_block(inside, "unused {name}") == groups
