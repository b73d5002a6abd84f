"""Importance matrices as llama-imatrix computes and stores them: the sums of squared inputs per
column of every decoder linear, keyed by GGUF name; its GGUF file format and the legacy .dat."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from joules.deploy.imatrix import (
    Imatrix,
    compute_imatrix,
    counted_tokens,
    imatrix_gguf_bytes,
    load_imatrix,
    save_imatrix,
)
from joules.errors import ConfigError
from joules.models import tiny_model

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def tiny():
    m, _, _ = tiny_model("llama", seed=0, layers=2)
    tokens = torch.randint(3, 384, (3, 40), generator=torch.Generator().manual_seed(1))
    return m, tokens


def test_imatrix_equals_a_direct_sum_of_squared_inputs(tiny):
    m, tokens = tiny
    im = compute_imatrix(m, tokens, dataset="unit")
    assert im.names() == sorted(f"blk.{i}.{k}.weight" for i in range(2) for k in KINDS)
    # q/k/v: the input-normed hidden state entering each block, from the model's own outputs
    with torch.no_grad():
        hs = m(tokens, output_hidden_states=True).hidden_states
        xs = [layer.input_layernorm(hs[i]) for i, layer in enumerate(m.model.layers)]
    for i, x in enumerate(xs):
        x = x.double().reshape(-1, m.config.hidden_size)
        want = (x * x).sum(0).numpy()
        for k in ("attn_q", "attn_k", "attn_v"):
            got = im.sums[f"blk.{i}.{k}.weight"]
            np.testing.assert_allclose(got, want, rtol=1e-5)
    # the others: every token's input, recorded by plain hooks, summed in numpy
    seen: dict[str, list[np.ndarray]] = {}
    names = {"o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up"}
    names["down_proj"] = "ffn_down"
    hooks = []
    for i, layer in enumerate(m.model.layers):
        for hf, g in names.items():
            mod = getattr(layer.self_attn if hf == "o_proj" else layer.mlp, hf)
            key = f"blk.{i}.{g}.weight"
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, a, key=key: seen.setdefault(key, []).append(a[0].numpy().copy())
                )
            )
    with torch.no_grad():
        m(tokens)
    for h in hooks:
        h.remove()
    for key, xs in seen.items():
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in xs]).astype(np.float64)
        np.testing.assert_allclose(im.sums[key], (x * x).sum(0), rtol=1e-5)
    assert im.sums["blk.0.ffn_down.weight"].shape == (m.config.intermediate_size,)
    assert all(int(c[0]) == tokens.numel() for c in im.counts.values())
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 40, ["unit"])
    np.testing.assert_array_equal(
        im.values("blk.1.ffn_up.weight"),
        im.sums["blk.1.ffn_up.weight"] / np.float32(tokens.numel()),
    )


def test_micro_batches_under_16_tokens_are_not_collected():
    assert counted_tokens(32, 512).all()
    # one 1030-token chunk: micro-batches of 512, 512 and 6 tokens; the last is dropped
    mask = counted_tokens(1, 1030)
    assert mask[0, :1024].all() and not mask[0, 1024:].any()
    assert not counted_tokens(1, 8).any()  # 8 tokens in one matmul
    assert counted_tokens(3, 8).all()  # 3 sequences decode together: 24 tokens


def test_compute_imatrix_refuses_what_llama_imatrix_would_not_collect(tiny):
    m, _ = tiny
    with pytest.raises(ConfigError, match="16 tokens"):
        compute_imatrix(m, torch.arange(3, 11).reshape(1, 8))
    with pytest.raises(ConfigError, match="n_chunks, chunk_len"):
        compute_imatrix(m, torch.arange(3, 35))


def test_output_head_only_when_asked_and_untied():
    m, _, _ = tiny_model("llama", seed=0, layers=1)
    tokens = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(2))
    assert "output.weight" not in compute_imatrix(m, tokens).sums
    im = compute_imatrix(m, tokens, process_output=True)
    with torch.no_grad():
        h = m.model(tokens).last_hidden_state.double().reshape(-1, m.config.hidden_size)
    np.testing.assert_allclose(im.sums["output.weight"], (h * h).sum(0), rtol=1e-5)
    tied, _, _ = tiny_model("llama", seed=0, layers=1, tie_word_embeddings=True)
    # a tied head multiplies by token_embd.weight in llama.cpp: never collected
    assert "output.weight" not in compute_imatrix(tied, tokens, process_output=True).sums


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    from gguf import GGUFReader

    m, tokens = tiny
    im = compute_imatrix(m, tokens, dataset="wikitext2-valid")
    path = save_imatrix(tmp_path / "im.gguf", im)
    back = load_imatrix(path)
    assert back.names() == im.names() and back.source == str(path)
    for n in im.names():
        np.testing.assert_array_equal(back.sums[n], im.sums[n])
        np.testing.assert_array_equal(back.counts[n], im.counts[n])
        np.testing.assert_array_equal(back.values(n), im.values(n))
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["wikitext2-valid"], 3, 40)
    assert imatrix_gguf_bytes(back) == path.read_bytes()  # a fixed point
    assert Imatrix.from_dict(im.to_dict()).to_dict() == im.to_dict()
    # readable by gguf's own reader: ggml layout, no general.architecture
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    t = {x.name: x for x in r.tensors}["blk.0.attn_q.weight.in_sum2"]
    assert [int(d) for d in t.shape] == [m.config.hidden_size]
    assert all(int(x.data_offset) % 32 == 0 for x in r.tensors)


def test_legacy_dat_values_are_mean_times_calls_over_calls(tmp_path):
    # the .dat stores (sum / count) * ncall and ncall; llama-quantize divides by ncall
    vals = np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name
    data += struct.pack("<ii", 4, vals.size) + vals.tobytes()
    data += struct.pack("<i", 4) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(data)
    im = load_imatrix(tmp_path / "im.dat")
    assert im.legacy and im.chunk_count == 4 and im.datasets == ["wiki"]
    np.testing.assert_array_equal(im.values("blk.0.attn_q.weight"), vals / 4)


def test_zero_count_entries_read_as_ones_like_llama_quantize():
    im = Imatrix(
        sums={"a": np.array([3.0, 6.0, 9.0, 12.0], np.float32)},
        counts={"a": np.array([3, 0], np.int64)},
    )
    np.testing.assert_array_equal(im.values("a"), np.array([1.0, 2.0, 1.0, 1.0], np.float32))
    with pytest.raises(ConfigError, match="no entry"):
        im.values("b")


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="no importance matrix"):
        load_imatrix(tmp_path / "none.gguf")
    (tmp_path / "x.dat").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(ConfigError, match="no entries"):
        load_imatrix(tmp_path / "x.dat")
