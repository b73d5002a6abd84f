import json

import pytest

from joules.errors import ConfigError
from joules.predict.shape import ModelShape

LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_llama2_7b_parameter_count_matches_the_published_6_74b():
    s = ModelShape.from_config(LLAMA2_7B)
    assert s.n_params == 6_738_415_616  # Llama-2-7B: 6.74 B (llama.cpp prints "6.74 B")
    assert (s.n_kv_heads, s.head_dim, s.mlp_matrices) == (32, 128, 3)


def test_gpt2_keys_and_ungated_mlp():
    s = ModelShape.from_config(
        {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    )
    assert (s.intermediate, s.mlp_matrices, s.tied_embeddings) == (3072, 2, True)


def test_sliding_layers_from_layer_types():
    cfg = {
        **LLAMA2_7B,
        "num_hidden_layers": 4,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    s = ModelShape.from_config(cfg)
    assert s.sliding_layers == (0, 2) and s.sliding_window == 128
    assert s.is_sliding(0) and not s.is_sliding(1)


def test_mistral_style_window_covers_every_layer():
    s = ModelShape.from_config({**LLAMA2_7B, "num_hidden_layers": 3, "sliding_window": 4096})
    assert s.sliding_layers == (0, 1, 2)


def test_missing_key_is_one_line_error():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelShape.from_config({"model_type": "llama", "vocab_size": 10})


def test_load_config_json_and_compressed_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    s, manifest = ModelShape.load(tmp_path / "config.json")
    assert s.hidden == 4096 and manifest is None
    (tmp_path / "joules.json").write_text(json.dumps({"layers": {}}))
    s2, manifest = ModelShape.load(tmp_path)
    assert s2.n_params == s.n_params and manifest == {"layers": {}}


def test_round_trip():
    s = ModelShape.from_config({**LLAMA2_7B, "sliding_window": 8, "num_hidden_layers": 2})
    assert ModelShape.from_dict(json.loads(json.dumps(s.to_dict()))) == s
