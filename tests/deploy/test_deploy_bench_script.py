"""benchmarks/deploy.py's Q4_K_M recipe: joules' GPTQ file holds, tensor for tensor, the types of
llama.cpp's own Q4_K_M file (K-quants where rows allow, llama.cpp's fallbacks elsewhere)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "deploy.py"


def _script():
    """The script as ``python benchmarks/deploy.py`` runs it: its folder first on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("bench_deploy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return mod


def test_q4_k_m_recipe_reproduces_llamacpp_type_mix(tmp_path, monkeypatch):
    from gguf import GGUFReader

    from joules.compress import calibration_tokens, compress
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import quantize_file
    from joules.models import load_model, save_tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(hidden_size=256, intermediate_size=512, heads=4, kv_heads=2, tie_word_embeddings=True)
    save_tiny_model(tmp_path / "t", "llama", seed=0, layers=4, **kw)
    export_gguf(tmp_path / "t", tmp_path / "f32.gguf")
    quantize_file(tmp_path / "f32.gguf", tmp_path / "peer.gguf", "Q4_K_M", threads=1)
    recipe = _script().q4_k_m_recipe(tmp_path / "peer.gguf")
    assert recipe.startswith("gptq(format=gguf-") and "overrides=" in recipe
    lm = load_model(tmp_path / "t")
    calib, _ = calibration_tokens(lm.tokenizer, n=2, length=16)
    compress(lm.model, recipe, calibration=calib).save(tmp_path / "c", lm.tokenizer)
    ref = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "peer.gguf")).tensors}
    emb = ref["token_embd.weight"].lower()
    export_gguf(tmp_path / "c", tmp_path / "ours.gguf", embedding=f"gguf-{emb}")
    ours = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    assert ours == ref
    assert len({t for n, t in ref.items() if n.startswith("blk.") and "norm" not in n}) >= 2
