"""Tests of the kvcache step: exactness, quantization accounting, sinks, heavy hitters, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from joules.compress import compress, load_compressed, parse_recipe
from joules.compress.steps.kvcache import (
    JoulesKVCache,
    JoulesKVLayer,
    KVSettings,
    kv_bytes_per_token,
)
from joules.errors import ConfigError
from joules.models import tiny_model
from joules.models.hf_cache import cache_kwarg, given_cache, output_cache


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (1, n), generator=g)


def _decode_logits(model: torch.nn.Module, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Token-by-token logits through one cache (the hook supplies it when ``cache`` is None)."""
    out, past = [], cache
    with torch.no_grad():
        for t in range(ids.shape[1]):
            r = model(ids[:, t : t + 1], **{cache_kwarg(model): past}, use_cache=True)
            past = output_cache(r)
            out.append(r.logits[:, -1])
    return torch.stack(out, 1), past


def test_full_fp32_is_bit_identical_to_dynamic_cache():
    model, _, _ = tiny_model("llama", seed=0)
    ids = _ids(20)
    ref, ref_past = _decode_logits(model, ids, DynamicCache(config=model.config))
    compress(model, "kvcache(policy=full)")
    got, past = _decode_logits(model, ids)
    assert isinstance(past, JoulesKVCache) and type(ref_past) is DynamicCache
    assert torch.equal(got, ref)


def test_quantized_cache_keeps_residual_and_reports_bytes():
    model, _, _ = tiny_model("llama", seed=0)
    ids = _ids(40)
    ref, _ = _decode_logits(model, ids, DynamicCache(config=model.config))
    cm = compress(model, "kvcache(format=int2, residual=8, group=8)")
    got, past = _decode_logits(model, ids)
    layer = past.layers[0]
    # 40 tokens, residual 8, group 8: 32 quantized, 8 full precision.
    assert layer.n_quant == 32 and layer.held() == 40
    # the first 8 + residual tokens saw no quantized keys: identical logits there
    assert torch.equal(got[:, :16], ref[:, :16])
    assert not torch.equal(got[:, 17:], ref[:, 17:])
    cfg = cm.manifest.runtime["kv_cache"]
    fp16 = kv_bytes_per_token(KVSettings(), model.config)
    assert cfg["emulated"] and 0 < cfg["kv_bytes_per_token"] < fp16 / 4
    assert past.nbytes() < 40 * fp16 * 2  # fp32 cache of 40 tokens costs 2x the fp16 figure


def test_kivi_keys_are_per_channel_values_per_token():
    s = KVSettings(format="int4", residual=0, group=4)
    layer = JoulesKVLayer(s)
    k = torch.randn(1, 1, 4, 8)
    k[..., 3] *= 100  # one outlier channel: per-channel scales keep the others precise
    layer.update(k, k.clone())
    err_k = (layer.keys - k).abs()[..., :3].max()
    err_v = (layer.values - k).abs()[..., :3].max()
    assert err_k < err_v


def test_sinks_bounded_and_matches_full_forward_when_it_fits():
    model, _, _ = tiny_model("llama", seed=1)
    ids = _ids(12, seed=1)
    with torch.no_grad():
        full = model(ids).logits
    compress(model, "kvcache(policy=sinks, n_sinks=2, window=10)")
    got, past = _decode_logits(model, ids)
    assert torch.allclose(got, full, atol=1e-5)
    more = _ids(30, seed=2)
    _, past = _decode_logits(model, more)
    assert all(layer.held() == 12 for layer in past.layers)
    assert past.get_seq_length() == 30


def test_sinks_positions_after_eviction_one_layer():
    # With one layer, keys/values depend only on token and position, so decoding through a
    # sinks cache must equal a full forward of [sinks + window + new token] (RoPE is relative).
    model, _, _ = tiny_model("llama", seed=2, layers=1)
    ids = _ids(25, seed=3)
    n_sinks, window = 3, 6
    compress(model, f"kvcache(policy=sinks, n_sinks={n_sinks}, window={window})")
    got, past = _decode_logits(model, ids)
    assert past.held() == n_sinks + window
    kept = torch.cat([ids[:, :n_sinks], ids[:, -(window + 1) :]], 1)
    for hook in model._joules_kv_hook:
        hook.remove()
    with torch.no_grad():
        ref = model(kept, use_cache=False).logits[:, -1]
    assert torch.allclose(got[:, -1], ref, atol=1e-4)


def test_heavy_hitters_keep_budget_and_evict_least_attended():
    s = KVSettings(policy="heavy_hitters", budget=4, window=1)
    layer = JoulesKVLayer(s)
    k = torch.arange(6.0).reshape(1, 1, 6, 1).expand(1, 1, 6, 2).contiguous()
    layer.update(k, k.clone())
    probs = torch.tensor([0.30, 0.01, 0.25, 0.02, 0.20, 0.22]).reshape(1, 1, 1, 6)
    layer.observe(probs)
    assert layer.held() == 4
    # recent token 5 always kept; then the 3 most attended of 0..4: 0, 2, 4
    assert layer.keys[0, 0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]


def test_heavy_hitters_through_model_generate():
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "kvcache(policy=heavy_hitters, budget=8)")
    ids = _ids(6)
    out = model.generate(
        ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    past = output_cache(out)
    assert isinstance(past, JoulesKVCache)
    assert all(layer.held() == 8 for layer in past.layers)
    assert out.sequences.shape[1] == 16


def test_reload_reinstalls_cache(tmp_path):
    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "kvcache(format=int8, policy=sinks, window=8)")
    cm.save(tmp_path, tok)
    loaded, _, manifest = load_compressed(tmp_path)
    assert manifest.runtime["kv_cache"]["policy"] == "sinks"
    _, past = _decode_logits(loaded, _ids(20))
    assert isinstance(past, JoulesKVCache) and past.held() == 12


@pytest.mark.parametrize(
    "recipe",
    [
        "kvcache(policy=lru)",
        "kvcache(policy=sinks)",
        "kvcache(policy=heavy_hitters)",
        "kvcache(policy=heavy_hitters, budget=4, window=8)",
        "kvcache(format=int4, policy=heavy_hitters, budget=4)",
        "kvcache(format=int77)",
        "kvcache(group=0)",
        "kvcache(granularity=row)",
        "kvcache(budget=3)",
    ],
)
def test_bad_parameters_are_one_line_errors(recipe):
    with pytest.raises(ConfigError) as e:
        parse_recipe(recipe).steps[0].validate()
    assert "\n" not in str(e.value)


def test_module_doctest():
    import doctest

    import joules.compress.steps.kvcache as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_cli_compress_then_load_model_uses_cache(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from joules.cli import app
    from joules.models import load_model

    out = tmp_path / "kv"
    recipe = "kvcache(format=int4, policy=sinks, window=8)"
    r = CliRunner().invoke(app, ["compress", str(tiny_dir), "-r", recipe, "-o", str(out)])
    assert r.exit_code == 0, r.output
    model, _, _ = load_model(out)
    _, past = _decode_logits(model, _ids(16))
    assert isinstance(past, JoulesKVCache) and past.held() == 12
    bad = CliRunner().invoke(
        app, ["compress", str(tiny_dir), "-r", "kvcache(policy=sinks)", "-o", str(out)]
    )
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_h2o_attention_matches_sdpa_without_eviction():
    model, _, _ = tiny_model("llama", seed=0)
    ids = _ids(10)
    ref, _ = _decode_logits(model, ids, DynamicCache(config=model.config))
    compress(model, "kvcache(policy=heavy_hitters, budget=64)")
    got, past = _decode_logits(model, ids)
    assert past.held() == 10
    assert torch.allclose(got, ref, atol=1e-5)


def test_sinks_with_quantization_keeps_sinks_exact_and_bounded():
    s = KVSettings(format="int4", policy="sinks", n_sinks=2, window=12, residual=4, group=4)
    layer = JoulesKVLayer(s, rotate=lambda k, d: k)
    ks = torch.randn(1, 2, 30, 8)
    for t in range(30):
        layer.update(ks[:, :, t : t + 1], ks[:, :, t : t + 1].clone())
        assert layer.held() <= 14
        assert layer.n_quant <= layer.held() - 2 - s.residual or layer.n_quant == 0
    assert torch.equal(layer.values[:, :, :2], ks[:, :, :2])  # sinks never quantized
    assert torch.equal(layer.values[:, :, -4:], ks[:, :, -4:])  # residual in full precision
    assert not torch.equal(layer.values[:, :, 2:6], ks[:, :, 18:22])  # older ones quantized


def test_decoder_alone_gets_cache_and_batch_repeat_keeps_scores():
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "kvcache(policy=heavy_hitters, budget=4)")
    with torch.no_grad():
        out = model.model(_ids(6), use_cache=True)
        past = output_cache(out)
        assert isinstance(past, JoulesKVCache) and past.held() == 4
        past.batch_repeat_interleave(3)
        more = model.model(_ids(6, seed=5)[:, :2].repeat(3, 1), **{cache_kwarg(model.model): past})
    assert output_cache(more).layers[0].scores.shape == (3, 2, 4)


def test_heavy_hitters_without_h2o_attention_is_an_error():
    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "kvcache(policy=heavy_hitters, budget=4)")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match="joules_h2o"):
        model(_ids(3), use_cache=True)


@pytest.mark.parametrize(
    "recipe",
    [
        "kvcache(format=int4, residual=8, group=8)",
        "kvcache(format=int8, granularity=token, residual=8, group=8)",
        "kvcache(policy=sinks, n_sinks=2, window=8)",
        "kvcache(policy=heavy_hitters, budget=8)",
        "kvcache(format=int4, policy=sinks, n_sinks=2, window=12, residual=4, group=4)",
    ],
)
def test_generate_uses_joules_cache_and_it_is_smaller(recipe):
    """What ``generate`` really ran with: every decoder call got the one JoulesKVCache, and it
    holds fewer bytes than the plain cache of the same tokens (the policy did something)."""
    model, _, _ = tiny_model("llama", seed=0)
    ids = _ids(12)
    plain = model.generate(
        ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    plain_cache = output_cache(plain)
    assert type(plain_cache) is DynamicCache
    plain_bytes = sum(
        t.numel() * t.element_size()
        for layer in plain_cache.layers
        for t in (layer.keys, layer.values)
    )
    compress(model, recipe)
    seen: list[object] = []

    def spy(_m, _args, kwargs):
        seen.append(given_cache(kwargs)[1])

    handle = model.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = model.generate(
            ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True, pad_token_id=0
        )
    finally:
        handle.remove()
    used = output_cache(out)
    assert isinstance(used, JoulesKVCache)
    assert len(seen) == 20 and all(c is used for c in seen)
    assert used.nbytes() < plain_bytes


def test_a_forward_that_bypasses_the_cache_fails_loudly():
    """A transformers release that ignores the cache the hook hands over must not pass silently."""
    from joules.compress.steps.kvcache import KVCacheBypassedError

    model, _, _ = tiny_model("llama", seed=0)
    compress(model, "kvcache(format=int4)")
    decoder = model.get_decoder()

    def swap(_m, _args, kwargs):  # stands in for a forward that builds its own cache
        name, _ = given_cache(kwargs)
        kwargs[name] = DynamicCache(config=model.config)
        return _args, kwargs

    handle = decoder.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        with pytest.raises(KVCacheBypassedError, match="JoulesKVCache"):
            model(_ids(4), use_cache=True)
    finally:
        handle.remove()


def test_load_refuses_a_runtime_setting_it_cannot_install(tmp_path):
    import json

    from joules.errors import UnsupportedModelError

    model, tok, _ = tiny_model("llama", seed=0)
    compress(model, "kvcache(format=int8)").save(tmp_path, tok)
    manifest = tmp_path / "joules.json"
    raw = json.loads(manifest.read_text())
    raw["runtime"]["kv_cache_v9"] = raw["runtime"].pop("kv_cache")
    manifest.write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="kv_cache_v9"):
        load_compressed(tmp_path)
