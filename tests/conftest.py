"""Shared fixtures: one load of the real default model per test session, tiny models for the rest."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M default model (loaded once; tests using it are marked real_model)."""
    from joules.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny():
    """A tiny seeded random llama (model, tokenizer, info); do not modify it in place."""
    from joules.models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny llama saved as a Hugging Face directory, for CLI tests that take a MODEL spec."""
    from joules.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama", seed=0)


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script(NAME)``: ``benchmarks/NAME.py`` as a module, loaded as ``python
    benchmarks/NAME.py`` runs it (its own folder first on ``sys.path``, where ``common`` is; by
    path, as ``benchmarks`` is no package)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", folder / f"{name}.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.path.remove(str(folder))
        return mod

    return load


@pytest.fixture
def wide_block_shape(tmp_path):
    """A config.json of 4 Llama blocks of 67 MB in fp32 (1024 wide, 4096 MLP) and a tiny
    vocabulary: depth, not the embedding, moves a peak. ``write_synthetic(path, layers=N)``."""
    import json

    cfg = tmp_path / "shape.json"
    shape = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024,
        intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8,
        num_hidden_layers=4, vocab_size=512, max_position_embeddings=512,
        tie_word_embeddings=False,
    )  # fmt: skip
    cfg.write_text(json.dumps(shape))
    return cfg
