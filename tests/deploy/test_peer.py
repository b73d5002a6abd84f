"""The llama.cpp peer without a source build: llama_model_quantize with the importance matrix
handed over as llama-quantize hands it. Without an imatrix it is quantize_file byte for byte;
with one, each tensor is ggml_quantize_chunk(type, F32 rows, imatrix) of its F32 data, the
types are the ones llama.cpp picks *with* an imatrix, and the quantize.imatrix.* metadata is
llama-quantize's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
from joules.deploy.imatrix import Imatrix, compute_imatrix
from joules.deploy.llamacpp import ggml_quantize, quantize_file
from joules.deploy.peer import PeerFile, base_f32_gguf, llamacpp_peer
from joules.errors import ConfigError

# 8 layers: llama.cpp's "first n_layer/8 layers" rules touch blk.0; rows of 256 keep K-types
KW = dict(layers=8, hidden_size=256, intermediate_size=512, heads=4, kv_heads=2)
KW["tie_word_embeddings"] = True


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from joules.models import load_model, save_tiny_model

    d = tmp_path_factory.mktemp("peer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JOULES_CACHE_DIR", str(d / "cache"))
        save_tiny_model(d / "t", "llama", seed=0, **KW)
        f32 = base_f32_gguf(d / "t")
        assert base_f32_gguf(d / "t") == f32  # cached
        lm = load_model(d / "t")
        tokens = torch.randint(3, 384, (2, 64), generator=torch.Generator().manual_seed(0))
        im = compute_imatrix(lm.model, tokens, dataset="unit-test")
    return d, f32, im


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _kv(path):
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}


@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M"])
def test_peer_without_imatrix_is_quantize_file_byte_for_byte(base, ftype):
    d, f32, _ = base
    quantize_file(f32, d / f"ref-{ftype}.gguf", ftype, threads=1)
    peer = llamacpp_peer(f32, ftype, d / f"peer-{ftype}.gguf", threads=1)
    assert (d / f"ref-{ftype}.gguf").read_bytes() == (d / f"peer-{ftype}.gguf").read_bytes()
    assert not peer.imatrix and peer.size_bytes == (d / f"peer-{ftype}.gguf").stat().st_size
    assert peer.types["token_embd.weight"] in ("Q6_K", "Q8_0")
    assert PeerFile.from_dict(peer.to_dict()) == peer


@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M", "IQ4_NL", "Q2_K"])
def test_peer_with_imatrix_is_ggml_quantize_chunk_per_tensor(base, ftype):
    d, f32, im = base
    peer = llamacpp_peer(f32, ftype, d / f"im-{ftype}.gguf", imatrix=im, threads=1)
    assert peer.imatrix
    src, out = _tensors(f32), _tensors(peer.path)
    assert set(src) == set(out)  # (llama.cpp writes them sorted by name)
    quantized = 0
    for name, t in out.items():
        assert peer.types[name] == t.tensor_type.name
        if t.tensor_type.name == "F32":
            continue
        x = np.asarray(src[name].data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        w = im.values(name) if name in im.sums else None
        want = ggml_quantize(x, t.tensor_type.name, w)
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
        quantized += name in im.sums
    assert quantized == len(im.names())  # every blk.* matrix used its importance
    kv = _kv(peer.path)
    assert kv["quantize.imatrix.file"] == "joules"
    assert kv["quantize.imatrix.dataset"] == "unit-test"
    assert kv["quantize.imatrix.entries_count"] == len(im.names())
    assert kv["quantize.imatrix.chunks_count"] == 2


def test_imatrix_changes_the_types_llama_cpp_picks(base):
    # with an imatrix, Q4_0 guards the first n_layer/8 ffn_down as Q4_1; without one IQ4_NL
    # stores them as Q5_K -- so the types must come from the imatrix run itself
    d, f32, im = base
    q4 = llamacpp_peer(f32, "Q4_0", d / "t-q4.gguf", threads=1)
    q4i = llamacpp_peer(f32, "Q4_0", d / "t-q4i.gguf", imatrix=im, threads=1)
    assert (q4.types["blk.0.ffn_down.weight"], q4i.types["blk.0.ffn_down.weight"]) == (
        "Q4_0",
        "Q4_1",
    )
    assert q4.types["blk.1.ffn_down.weight"] == q4i.types["blk.1.ffn_down.weight"] == "Q4_0"
    nl = llamacpp_peer(f32, "IQ4_NL", d / "t-nl.gguf", threads=1)  # runs without an imatrix
    nli = llamacpp_peer(f32, "IQ4_NL", d / "t-nli.gguf", imatrix=im, threads=1)
    assert (nl.types["blk.0.ffn_down.weight"], nli.types["blk.0.ffn_down.weight"]) == (
        "Q5_K",
        "IQ4_NL",
    )


def test_uniform_imatrix_is_not_no_imatrix(base):
    # all-ones importance: llama.cpp switches Q4_0 (and K/IQ types) from the reference rounding
    # to its weighted search, so the bytes change; Q8_0 ignores the imatrix (same bytes)
    d, f32, im = base
    ones = Imatrix(
        sums={n: np.ones_like(v) for n, v in im.sums.items()},
        counts={n: np.ones_like(c) for n, c in im.counts.items()},
    )
    for ftype, same in (("Q8_0", True), ("Q4_0", False), ("Q4_K_M", False)):
        a = _tensors(llamacpp_peer(f32, ftype, d / f"u-{ftype}.gguf", threads=1).path)
        b = _tensors(llamacpp_peer(f32, ftype, d / f"u1-{ftype}.gguf", imatrix=ones).path)
        name = "blk.3.attn_q.weight"  # the same type in both files
        assert a[name].tensor_type == b[name].tensor_type
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)) is same, ftype


def test_presets_refused_where_llama_cpp_refuses(base):
    d, f32, _ = base
    with pytest.raises(ConfigError, match="without an importance matrix") as e:
        llamacpp_peer(f32, "IQ3_XXS", d / "x.gguf")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="use one of"):
        llamacpp_peer(f32, "Q3_K_XL", d / "x.gguf")
    assert not (d / "x.gguf").exists()


def test_ggml_quantize_takes_one_importance_per_column():
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    w = np.random.default_rng(1).random(64).astype(np.float32)
    assert not np.array_equal(ggml_quantize(x, "Q4_0", w), ggml_quantize(x, "Q4_0"))
    assert np.array_equal(ggml_quantize(x, "Q8_0", w), ggml_quantize(x, "Q8_0"))
    with pytest.raises(ConfigError, match="one per column"):
        ggml_quantize(x, "Q4_0", np.ones(65, np.float32))
