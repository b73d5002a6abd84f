import itertools

import pytest

from joules.predict import Prediction, Workload, predict
from joules.predict.roofline import Coefficients

from .conftest import synthetic_hw

FORMATS_BY_BITS = ["int2-g64", "int3-g64", "int4-g32", "int8-ch", "bf16", "fp32"]


@pytest.mark.parametrize("hw", ["h100", "a100", "l4", "m2", "orin", "x86-server"])
def test_every_prediction_is_labelled_predicted_and_round_trips(small_shape, hw):
    p = predict(small_shape, hw, Workload(prompt_len=32, gen_len=4), weight_format="int4-g128")
    assert p.method == "predicted"
    assert Prediction.from_dict(p.to_dict()) == p
    assert p.to_dict()["method"] == "predicted"
    assert not p.calibrated and p.band == {}  # no band is claimed without a calibration


@pytest.mark.parametrize("hw", ["h100", "x86-server"])
def test_monotone_in_bits_per_weight(small_shape, hw):
    wl = Workload(prompt_len=64, gen_len=8)
    preds = [predict(small_shape, hw, wl, weight_format=f) for f in FORMATS_BY_BITS]
    bits = [p.bits_per_weight for p in preds]
    assert bits == sorted(bits)
    for lo, hi in itertools.pairwise(preds):
        assert lo.tpot_s <= hi.tpot_s
        assert lo.weights_bytes < hi.weights_bytes
        assert lo.peak_memory_bytes < hi.peak_memory_bytes
        assert lo.decode_energy_j <= hi.decode_energy_j


def test_monotone_in_sequence_length(small_shape):
    hw = synthetic_hw()
    coef = Coefficients(
        overhead_s={"prefill": 1e-6, "decode": 1e-6}, static_w=5.0, e_flop_j=1e-11, e_byte_j=1e-10
    )
    last = None
    for p_len in (16, 64, 256, 1024):
        p = predict(small_shape, hw, Workload(prompt_len=p_len, gen_len=8), coefficients=coef)
        if last is not None:
            assert p.prefill_s > last.prefill_s and p.tpot_s > last.tpot_s
            assert p.kv_cache_bytes > last.kv_cache_bytes
            assert p.prefill_energy_j > last.prefill_energy_j
        last = p
    short = predict(small_shape, hw, Workload(prompt_len=16, gen_len=4), coefficients=coef)
    long = predict(small_shape, hw, Workload(prompt_len=16, gen_len=64), coefficients=coef)
    assert long.decode_s > short.decode_s and long.tpot_s > short.tpot_s


def test_prefill_compute_bound_and_decode_memory_bound_on_a_gpu():
    from joules.predict.shape import ModelShape

    # hidden 4096: a linear's intensity (~hidden/2 FLOP per byte at bf16) exceeds the H100's
    # ridge point (989 TFLOP/s / 3.35 TB/s = 295); hidden 256 would not.
    s = ModelShape("7b-like", "llama", 2, 4096, 32, 8, 128, 11008, 32000)
    p = predict(s, "h100", Workload(prompt_len=2048, gen_len=8, batch=1))
    assert p.bound("prefill") == "compute" and p.bound("decode") == "memory"


def test_manifest_overrides_layers_and_kv_policy(small_shape):
    wl = Workload(prompt_len=512, gen_len=4)
    base = predict(small_shape, "h100", wl, weight_format="bf16")
    layers = {}
    for i in range(small_shape.n_layers):
        for sub in small_shape.linear_shapes():
            layers[f"model.layers.{i}.{sub}"] = {
                "format": "int4-g64",
                "bits_per_weight": 4.25,
                "path": "kernel:int4",
            }
    manifest = {
        "recipe": "gptq(format=int4-g64)",
        "layers": layers,
        "runtime": {
            "kv_cache": {"format": "int4-g32", "policy": "sinks", "n_sinks": 4, "window": 60}
        },
    }
    q = predict(small_shape, "h100", wl, manifest=manifest)
    assert q.weight_format == "manifest"
    assert q.bits_per_weight == pytest.approx(4.25)
    assert q.kv_cache_bytes < base.kv_cache_bytes / 8  # 4.5 bits and 64 of 516 positions
    # an emulated layer moves a dense copy too: slower than the kernel path
    emu = {k: {**v, "path": "emulated"} for k, v in layers.items()}
    e = predict(small_shape, "h100", wl, manifest={"layers": emu})
    k = predict(small_shape, "h100", wl, manifest={"layers": layers})
    assert e.tpot_s > k.tpot_s


def test_bad_workload_is_one_line_error():
    from joules.errors import ConfigError

    with pytest.raises(ConfigError, match="prompt_len"):
        Workload(prompt_len=0)


def test_a_real_compressed_directory_is_read_through_its_manifest(tmp_path):
    from joules.compress.api import compress
    from joules.compress.recipe import parse_recipe
    from joules.models import load_model
    from joules.models.tiny import save_tiny_model
    from joules.predict.shape import ModelShape

    model, tok, _ = load_model(save_tiny_model(tmp_path / "m"))
    compress(model, parse_recipe("rtn(format=int4-g32)")).save(tmp_path / "c", tok)
    shape, manifest = ModelShape.load(tmp_path / "c")
    assert manifest is not None and shape.n_layers == 2
    p = predict(shape, "h100", Workload(prompt_len=16, gen_len=4), manifest=manifest)
    assert p.weight_format == "manifest"
    assert p.bits_per_weight == pytest.approx(manifest["bits_per_weight"])
    dense = predict(shape, "h100", Workload(prompt_len=16, gen_len=4), weight_format="bf16")
    assert p.weights_bytes < dense.weights_bytes
