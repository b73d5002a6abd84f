import pytest
import torch

from joules.errors import ConfigError
from joules.models import TINY_ARCHS, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_same_weights_other_seed_other_weights(arch):
    a = tiny_model(arch, seed=3).model.state_dict()
    b = tiny_model(arch, seed=3).model.state_dict()
    c = tiny_model(arch, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_model(seed=123)
    assert torch.equal(torch.rand(3), expected)


def test_info_matches_the_config():
    _, _tok, info = tiny_model("llama", layers=3, hidden_size=32, heads=2, kv_heads=1)
    assert (info.layers, info.hidden_size, info.heads, info.kv_heads, info.head_dim) == (
        3,
        32,
        2,
        1,
        16,
    )
    assert info.gguf_types == {} and info.prequantized is None


def test_byte_tokenizer_round_trips_any_text(tiny):
    _, tok, _ = tiny
    text = "naïve café — 3.14 ≠ π\n"
    ids = tok(text)["input_ids"]
    assert max(ids) < 259
    assert tok.decode(ids) == text


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown tiny architecture"):
        tiny_model("gpt5")
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny_model(vocab_size=100)
