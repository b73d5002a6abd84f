import json

import pytest
import torch

from joules.errors import JoulesError, ModelNotFoundError, UnsupportedModelError
from joules.models import load_model, resolve, save_tiny_model


def test_missing_path_names_the_problem_and_the_accepted_specs(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no model at .*smollm2-135m.*\.gguf"):
        load_model(tmp_path / "nope")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UnsupportedModelError, match=r"without config\.json"):
        resolve(tmp_path)


def test_plain_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(UnsupportedModelError, match=r"not a \.gguf file"):
        resolve(f)


def test_corrupt_gguf_is_a_joules_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(JoulesError, match="GGUF"):
        load_model(f)


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "vit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_model(d)


def test_hf_directory_round_trip(tmp_path, tiny):
    path = save_tiny_model(tmp_path / "m", "llama", seed=0)
    model, _tok, info = load_model(path)
    assert info.source == str(path)
    assert info.parameters == tiny.info.parameters
    x = torch.tensor([[1, 5, 9, 200]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, tiny.model(x).logits)


@pytest.mark.real_model
def test_default_model_info(smollm2):
    _model, _tok, info = smollm2
    assert info.layers == 30
    assert info.hidden_size == 576
    assert info.heads == 9 and info.kv_heads == 3
    assert info.vocab_size == 49152
    assert abs(info.parameters - 134.5e6) < 0.1e6
    assert info.tied_embeddings
    # Attention and MLP weights were stored Q4_1 in the GGUF file; the embedding Q8_0.
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert info.gguf_types[f"model.layers.7.{name}.weight"] == "Q4_1"
    assert info.gguf_types["model.embed_tokens.weight"] == "Q8_0"
    assert info.prequantized == "Q4_1"


@pytest.mark.real_model
def test_default_model_logits_are_finite_and_sensible(smollm2):
    model, tok, _ = smollm2
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


def _pickle_dir(d, tiny):
    """A Hugging Face directory whose weights are only pytorch_model.bin (a pickle)."""
    d.mkdir()
    tiny.model.config.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    torch.save(tiny.model.state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_only_directory_is_refused_with_how_to_convert(tmp_path, tiny):
    # transformers would unpickle pytorch_model.bin (running whatever code it holds)
    d = _pickle_dir(tmp_path / "pickled", tiny)
    with pytest.raises(UnsupportedModelError, match=r"only as pickle.*save_pretrained") as err:
        load_model(d)
    assert "\n" not in str(err.value)


def test_safetensors_are_loaded_even_beside_a_pickle(tmp_path, tiny, monkeypatch):
    path = save_tiny_model(tmp_path / "both", "llama", seed=0)
    _pickle_dir(tmp_path / "pickled", tiny)
    (tmp_path / "pickled" / "pytorch_model.bin").rename(path / "pytorch_model.bin")
    import torch.serialization

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(torch.serialization, "load", no_pickle)
    model, _tok, _info = load_model(path)
    x = torch.tensor([[1, 5, 9, 200]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, tiny.model(x).logits)
