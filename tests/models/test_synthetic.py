"""Synthetic checkpoints of real shapes (joules.models.synthetic)."""

from __future__ import annotations

import json

import pytest
import torch

from joules.errors import ConfigError
from joules.models import load_model
from joules.models.synthetic import (
    SYNTHETIC_LABEL,
    shipped_configs,
    synthetic_config,
    tensor_shapes,
    write_synthetic,
)

SMALL = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
    vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip


def _params(name: str) -> int:
    return sum(
        int(torch.Size(s).numel()) for s, _ in tensor_shapes(synthetic_config(name)).values()
    )


@pytest.mark.parametrize(
    ("name", "published"),
    # parameter counts on the model cards (tied embeddings counted once)
    [("llama-3.2-1b", 1.236e9), ("llama-3.2-3b", 3.213e9), ("llama-3-8b", 8.030e9),
     ("smollm2-135m", 134.5e6)],
)  # fmt: skip
def test_shipped_shapes_have_their_published_sizes(name, published):
    assert name in shipped_configs()
    assert _params(name) == pytest.approx(published, rel=2e-3)


def test_written_checkpoint_loads_with_its_vocabulary_and_label(tmp_path):
    cfg = tmp_path / "shape.json"
    cfg.write_text(json.dumps(SMALL))
    out = write_synthetic(cfg, tmp_path / "m", shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    model, tok, info = load_model(out)
    assert len(tok) == SMALL["vocab_size"] == info.vocab_size
    assert info.synthetic == SYNTHETIC_LABEL
    assert info.dtype == "bfloat16"
    assert model.model.norm.weight.eq(1).all()
    w = model.model.layers[0].mlp.down_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025  # initializer_range 0.02
    text = "Synthetic weights, real shapes."
    assert tok.decode(tok(text)["input_ids"]) == text
    # the same seed writes the same tensors; another seed other ones
    again = write_synthetic(cfg, tmp_path / "again", shard_bytes=100_000)
    other = write_synthetic(cfg, tmp_path / "other", seed=1)
    a = load_model(again).model.state_dict()
    b = load_model(other).model.state_dict()
    ref = model.state_dict()
    assert all(torch.equal(ref[k], a[k]) for k in ref)
    assert not torch.equal(ref["lm_head.weight"], b["lm_head.weight"])


def test_layers_and_unknown_shapes(tmp_path):
    assert synthetic_config("llama-3-8b", layers=2)["num_hidden_layers"] == 2
    with pytest.raises(ConfigError, match=r"no model shape 'llama-99b'.*llama-3.2-1b"):
        synthetic_config("llama-99b")
    with pytest.raises(ConfigError, match="at least one block"):
        synthetic_config("llama-3-8b", layers=0)


def test_the_label_follows_compression_and_the_sweeps_baseline(tmp_path):
    from joules.compress import compress
    from joules.sweep.stages import baseline_manifest

    cfg = tmp_path / "shape.json"
    cfg.write_text(json.dumps({**SMALL, "num_hidden_layers": 1}))
    model, _, info = load_model(write_synthetic(cfg, tmp_path / "m"))
    assert baseline_manifest(model, info)["synthetic"] == SYNTHETIC_LABEL
    cm = compress(model, "rtn(format=int8)")
    assert cm.manifest.synthetic == SYNTHETIC_LABEL
    assert cm.manifest.summary()["synthetic"] == SYNTHETIC_LABEL
