"""heads(chai): GQA-constrained clustering, identical heads merge without changing outputs."""

from __future__ import annotations

import pytest
import torch

from joules.compress import calibration_tokens, compress, parse_recipe
from joules.compress.steps.heads import cluster_heads, head_correlation
from joules.errors import ConfigError
from joules.models import tiny_model


def test_clusters_respect_kv_groups():
    # 4 heads, 2 KV groups: heads 0 and 2 (different groups) look most alike, but sharing their
    # scores would need shared keys for heads 1 and 3 too: not allowed until groups are whole.
    corr = torch.tensor(
        [[1.0, 0.5, 0.99, 0.1], [0.5, 1.0, 0.1, 0.2], [0.99, 0.1, 1.0, 0.6], [0.1, 0.2, 0.6, 1.0]]
    )
    assert cluster_heads(corr, [0, 0, 1, 1], 3) == [[0], [1], [2, 3]]  # 0.6 > 0.5
    two = cluster_heads(corr, [0, 0, 1, 1], 2)
    assert sorted(two) == [[0, 1], [2, 3]]
    one = cluster_heads(corr, [0, 0, 1, 1], 1)  # whole groups may merge: keys shared
    assert one == [[0, 1, 2, 3]]


def test_correlation_of_identical_maps_is_one():
    p = torch.rand(2, 3, 8, 8).tril().softmax(-1)
    p[:, 1] = p[:, 0]
    c = head_correlation(p)
    assert c[0, 1] == pytest.approx(1.0, abs=1e-6) and c[0, 2] < 0.999


def test_identical_heads_merge_and_change_nothing():
    model, tok, _ = tiny_model("llama", seed=0)  # 4 heads of 16, 2 KV groups
    hd = 16
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            q[hd : 2 * hd] = q[:hd]  # head 1 == head 0 (same KV group)
            q[3 * hd :] = q[2 * hd : 3 * hd]  # head 3 == head 2
    calib, _ = calibration_tokens(tok, n=4, length=32)
    ids = calib[:2, :20]
    with torch.no_grad():
        before = model(ids).logits
    cm = compress(model, "heads(keep=2)", calibration=calib)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)
    e = cm.manifest.layers["model.layers.0.self_attn"]
    assert sorted(e["clusters"]) == [[0, 1], [2, 3]]
    assert e["score_flops_saving"] == 0.5 and e["k_cache_saving"] == 0.0


def test_whole_group_merge_shares_keys():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, "heads(keep=1)", calibration=calib)
    e = cm.manifest.layers["model.layers.1.self_attn"]
    assert e["k_heads"] == 1 and e["k_cache_saving"] == 0.5
    k = model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(k[:16], k[16:])


def test_bad_heads_parameters():
    with pytest.raises(ConfigError, match="keep at least 1"):
        parse_recipe("heads(keep=0)")
    with pytest.raises(ConfigError, match="only method is chai"):
        parse_recipe("heads(method=foo)")
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    with pytest.raises(ConfigError, match="only 4 heads"):
        compress(model, "heads(keep=9)", calibration=calib)


def test_min_similarity_stops_merging_and_records_each_merge():
    corr = torch.tensor(
        [[1.0, 0.5, 0.99, 0.1], [0.5, 1.0, 0.1, 0.2], [0.99, 0.1, 1.0, 0.6], [0.1, 0.2, 0.6, 1.0]]
    )
    merges: list[float] = []
    # floor 1, but only pairs correlating >= 0.55 merge: just (2, 3) at 0.6
    assert cluster_heads(corr, [0, 0, 1, 1], 1, 0.55, merges) == [[0], [1], [2, 3]]
    assert merges == [pytest.approx(0.6)]


def test_first_layers_stay_whole_and_threshold_is_per_layer():
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(model, "heads(keep=1, first_layer=1)", calibration=calib)
    first, second = (cm.manifest.layers[f"model.layers.{i}.self_attn"] for i in (0, 1))
    assert first["score_patterns"] == 4 and first["merge_similarities"] == []
    assert second["score_patterns"] == 1 and len(second["merge_similarities"]) == 3
    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "heads(keep=1, min_similarity=1.0)", calibration=calib)
    assert all(e["score_patterns"] == 4 for e in cm.manifest.layers.values())  # none identical


def test_bad_threshold_and_first_layer():
    with pytest.raises(ConfigError, match=r"in \[-1, 1\]"):
        parse_recipe("heads(min_similarity=1.5)")
    model, tok, _ = tiny_model("llama", seed=0)
    calib, _ = calibration_tokens(tok, n=2, length=16)
    with pytest.raises(ConfigError, match="has 2 layers"):
        compress(model, "heads(keep=2, first_layer=2)", calibration=calib)
