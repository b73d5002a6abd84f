"""Loading a compressed directory never materialises the dense model it came from."""

from __future__ import annotations

import torch

from joules.compress import compress, load_compressed
from joules.models import tiny_model


def test_the_skeleton_holds_no_dense_weights(tmp_path, monkeypatch):
    """The model a compressed directory is loaded into allocates no dense weight: the old loader
    built (and randomly initialised) the full fp32 model first, so a bench of an int4 model in a
    fresh process counted a dense copy in its peak RSS."""
    import transformers

    model, tok, _ = tiny_model("llama", seed=0, hidden_size=256, layers=2, intermediate_size=512)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    compress(model, "rtn(format=int4-g64)").save(tmp_path / "q", tok)
    real = transformers.AutoModelForCausalLM.from_config
    held: list[int] = []

    def spy(config, **kw):
        skeleton = real(config, **kw)
        held.append(
            sum(p.numel() * p.element_size() for p in skeleton.parameters() if not p.is_meta)
        )
        return skeleton

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    load_compressed(tmp_path / "q")
    assert held == [0], (held, dense_bytes)


def test_meta_skeleton_loads_the_same_model(tmp_path):
    model, tok, _ = tiny_model("llama", seed=3, tie_word_embeddings=True)
    cm = compress(model, "rtn(format=int8-ch)")
    cm.save(tmp_path / "q", tok)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(ids).logits
    loaded, _, _ = load_compressed(tmp_path / "q")
    assert not any(p.is_meta for p in loaded.parameters())
    assert (
        loaded.get_output_embeddings().weight.data_ptr()
        == (loaded.get_input_embeddings().weight.data_ptr())
        or not model.config.tie_word_embeddings
    )
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, ref)
