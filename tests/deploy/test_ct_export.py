"""compressed-tensors export: the package's own decompressor reads the written codes, scales and
zero points back to joules' dequantized weights (cast to the checkpoint's scale dtype) bit for bit;
transformers loads the folder to joules' logits; unmappable layers are refused in one line (or
written dense with --dequantize); vLLM's fused q/k/v and gate/up take one scheme."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from joules.cli import app
from joules.compress import calibration_tokens, compress
from joules.compress.modules.linear import CompressedLinear, set_kernels
from joules.deploy import export_compressed_tensors
from joules.deploy.ct_export import RECORD_FILE, pack_int32, read_record
from joules.errors import ConfigError
from joules.models import load_model, tiny_model

runner = CliRunner()
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 100, 4, 8, 200, 17, 3, 64]])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(min(torch.get_num_threads(), 2))


def _compressed(tmp_path, recipe: str):
    m, tok, _ = tiny_model("llama", seed=0)
    calib = None
    if recipe.startswith(("gptq", "awq")):
        calib, _ = calibration_tokens(tok, n=4, length=32)
    cm = compress(m, recipe, calibration=calib)
    d = tmp_path / "q"
    cm.save(d, tok)
    return d, cm


def _decompress(ct_dir):
    """Every quantized layer's weight as compressed-tensors' own decompressor decodes it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(
        json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    )
    state = load_file(str(ct_dir / "model.safetensors"))
    layers = sorted({k.rpartition(".")[0] for k in state if k.endswith(".weight_packed")})
    record = read_record(ct_dir)
    out = {}
    for name in layers:
        # the group whose targets name the layer (or "Linear", when there is one group)
        scheme = next(
            s for s in qc.config_groups.values() if name in s.targets or s.targets == ["Linear"]
        )
        assert scheme.format == "pack-quantized"
        local = {
            k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")
        }
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        out[name] = compressor.decompress(local, scheme)["weight"]
    assert set(out) == {x.name for x in record.layers if x.scheme}
    return out


def test_pack_int32_is_compressed_tensors_layout():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for cols in (64, 40, 7):  # whole words, a partial last word
            codes = torch.randint(0, 2**bits, (6, cols), generator=g)
            signed = (codes - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
            assert torch.equal(
                pack_int32(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0)
            )


@pytest.mark.parametrize(
    "recipe",
    [
        "rtn(format=int4-g32)",
        "rtn(format=uint4-asym-g32-zpint)",
        "rtn(format=int8-ch)",
        "rtn(format=uint8-asym-ch-zpint)",
        "rtn(format=int4-g64-sbf16)",  # a bf16 checkpoint
        "gptq(format=int4-g32)",  # act_order with static groups: no g_idx
        "awq(format=uint4-asym-g64-zpint)",
        'gptq(format=int4-g32, overrides=["*.mlp.down_proj=int8-ch"])',  # two config groups
    ],
)
def test_decompressor_gives_joules_weights_in_the_scale_dtype_bit_for_bit(tmp_path, recipe):
    pytest.importorskip("compressed_tensors")
    d, cm = _compressed(tmp_path, recipe)
    res = export_compressed_tensors(d, tmp_path / "ct")
    dt = torch.bfloat16 if "sbf16" in recipe else torch.float16  # the scales' dtype
    assert res.dtype == str(dt).removeprefix("torch.") and res.format == "pack-quantized"
    assert all(x.exact for x in res.layers if x.scheme)
    got = _decompress(tmp_path / "ct")
    mods = {n: m for n, m in cm.model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(got) == set(mods)
    for name, w in got.items():
        want = mods[name].dequantize_weight().to(dt)
        assert w.dtype == dt
        assert torch.equal(w.view(torch.int16), want.view(torch.int16)), name
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["ignore"] == ["lm_head"]  # the tiny model's head stays dense
    assert "g_idx" not in " ".join(load_file(str(tmp_path / "ct" / "model.safetensors")))
    assert len(qc["config_groups"]) == (2 if "overrides" in recipe else 1)


def _round_through(model, dtype, *, quantized: bool) -> None:
    """Round ``model``'s float parameters (and, with ``quantized``, its compressed linears'
    decoded weights, kept as their cached decode) through ``dtype``: what the checkpoint holds."""
    for p in model.parameters():
        p.data = p.data.to(dtype).float()
    for m in model.modules():
        if quantized and isinstance(m, CompressedLinear):
            w = m.dequantize_weight().to(dtype).float()
            m.cache_dequantized, m._w_cache = True, w


@pytest.mark.parametrize(
    "recipe, dequantize_on_load",
    [
        ("gptq(format=int4-g32)", False),
        ("rtn(format=int8-ch)", False),
        # transformers 5.25 with compressed-tensors 0.20.1 cannot load an asymmetric
        # pack-quantized checkpoint compressed: its meta-device set-up leaves the zero point
        # unpacked ([out, groups]) while the checkpoint holds it packed, as compressed-tensors'
        # own compressor writes it (a checkpoint it compressed itself fails the same way).
        # Loading it dequantized decodes it in the checkpoint's fp16.
        ("rtn(format=uint4-asym-g32-zpint)", True),
    ],
)
def test_transformers_loads_the_folder_to_joules_logits(tmp_path, recipe, dequantize_on_load):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    d, _ = _compressed(tmp_path, recipe)
    export_compressed_tensors(d, tmp_path / "ct")
    kw = {}
    if dequantize_on_load:
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    ref = load_model(d).model
    set_kernels(ref, False)  # the dequantize-then-matmul product transformers computes
    with torch.no_grad():
        ref32 = ref(TOKENS).logits
        # the checkpoint holds the floats (embeddings, norms, the dense head) in fp16; loaded
        # compressed in fp32, the quantized weights decode exactly to joules' fp32 ones
        _round_through(ref, torch.float16, quantized=dequantize_on_load)
        ref32_rounded = ref(TOKENS).logits
        ct32 = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **kw)
        got32 = ct32(TOKENS).logits
    torch.testing.assert_close(got32, ref32_rounded)
    assert not torch.equal(ref32, ref32_rounded)  # the rounding is visible at this tolerance
    if dequantize_on_load:
        return

    ct16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # the checkpoint's fp16
    ref16_model = load_model(d, dtype=torch.float16).model
    set_kernels(ref16_model, False)
    with torch.no_grad():
        got16 = ct16(TOKENS).logits.float()
        ref16 = ref16_model(TOKENS).logits.float()
    assert ct16.dtype == torch.float16
    # two fp16 runs of the same weights differ by no more than fp16 moves joules' own logits
    assert (got16 - ref16).abs().max() <= (ref16 - ref32).abs().max()


def test_refuses_unmappable_formats_with_what_maps(tmp_path):
    for recipe, why in [
        ("rtn(format=gguf-q4_0)", "not an integer format"),
        ("rtn(format=int8)", "one scale per tensor"),
        ("rtn(format=int3-g32)", "3-bit codes"),
        ("rtn(format=uint4-asym-g32)", "float minimum"),
        ("rtn(format=int4-g32-s32)", "fp32 scales"),
        ("rtn(format=int4-g48)", "do not divide rows"),
    ]:
        d, _ = _compressed(tmp_path, recipe)
        with pytest.raises(ConfigError) as e:
            export_compressed_tensors(d, tmp_path / "ct")
        msg = str(e.value)
        assert why in msg and "int4-g64" in msg and "--dequantize" in msg, msg
        assert "\n" not in msg
    assert not (tmp_path / "ct").exists()


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    d, _ = _compressed(tmp_path, "rtn(format=nf4)")
    r = runner.invoke(
        app, ["export", str(d), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")]
    )
    assert r.exit_code == 2
    assert "no compressed-tensors form" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app,
        [
            "export",
            str(d),
            "--to",
            "compressed-tensors",
            "-o",
            str(tmp_path / "ct"),
            "--float-type",
            "f16",
        ],
    )
    assert r.exit_code == 2 and "GGUF option" in r.output


def test_dequantize_writes_unmappable_layers_dense(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    d, cm = _compressed(tmp_path, 'gptq(format=int4-g32, overrides=["*.mlp.down_proj=nf4"])')
    with pytest.raises(ConfigError, match="pass --dequantize f16"):
        export_compressed_tensors(d, tmp_path / "ct", dequantize="bf16")  # scales are fp16
    res = export_compressed_tensors(d, tmp_path / "ct", dequantize="f16")
    downs = [x for x in res.layers if x.name.endswith("down_proj")]
    assert downs and all(x.scheme is None and not x.exact for x in downs)
    assert not res.exact
    assert set(res.ignore) == {x.name for x in downs} | {"lm_head"}
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    for x in downs:
        want = dict(cm.model.named_modules())[x.name].dequantize_weight().to(torch.float16)
        assert torch.equal(dict(ct.named_modules())[x.name].weight, want.float())


def test_fused_projections_must_share_a_scheme(tmp_path):
    d, _ = _compressed(tmp_path, 'gptq(format=int4-g32, overrides=["*.self_attn.k_proj=int8-ch"])')
    with pytest.raises(ConfigError, match="q_proj/k_proj/v_proj into one layer"):
        export_compressed_tensors(d, tmp_path / "ct")


def test_cli_writes_the_folder_and_refuses_a_foreign_one(tmp_path):
    pytest.importorskip("compressed_tensors")
    d, _ = _compressed(tmp_path, "rtn(format=int4-g32)")
    out = tmp_path / "ct"
    r = runner.invoke(
        app, ["export", str(d), "--to", "compressed-tensors", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["scheme_counts"] == {"int4 sym group 32": 14, "dense": 1}
    assert (out / RECORD_FILE).is_file() and (out / "tokenizer.json").is_file()
    # a second export replaces its own earlier folder; another folder is never replaced
    assert (
        runner.invoke(
            app, ["export", str(d), "--to", "compressed-tensors", "-o", str(out)]
        ).exit_code
        == 0
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    r = runner.invoke(app, ["export", str(d), "--to", "compressed-tensors", "-o", str(foreign)])
    assert r.exit_code == 2 and (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "recipe, why",
    [
        ("act_quant(format=int8) | rtn(format=int4-g32)", "activations at run time"),
        ("rtn(format=int4-g32) | kvcache(format=int4, residual=32, group=32)", "KV-cache policy"),
    ],
)
def test_runtime_behaviour_is_refused_even_with_dequantize(tmp_path, recipe, why):
    d, _ = _compressed(tmp_path, recipe)
    with pytest.raises(ConfigError, match=why):
        export_compressed_tensors(d, tmp_path / "ct", dequantize="f16")
