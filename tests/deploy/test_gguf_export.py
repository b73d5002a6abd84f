"""GGUF export: tensors written as computed (gguf's reader decodes them to joules' weights bit for
bit), attn_q/attn_k permutation round trip, the written file loads to the same logits, refusals
and one-line errors for unmappable formats and truncated or foreign files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from joules.cli import app
from joules.compress import compress
from joules.deploy import export_gguf, permute_rows, unpermute_rows
from joules.errors import ConfigError, UnsupportedModelError
from joules.models import load_model, tiny_model

gguf = pytest.importorskip("gguf")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))


def _compressed(tmp_path, recipe: str, **kw):
    m, tok, _ = tiny_model("llama", seed=0, **kw)
    cm = compress(m, recipe)
    d = tmp_path / "c"
    cm.save(d, tok)
    return d, cm


def test_permutation_round_trips_through_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor

    w = torch.randn(12 * 16, 40)
    blocks = torch.randint(0, 256, (12 * 16, 36), dtype=torch.uint8)
    for heads in (12, 4):
        assert torch.equal(unpermute_rows(permute_rows(w, heads), heads), w)
        assert torch.equal(unpermute_rows(permute_rows(blocks, heads), heads), blocks)
        assert not torch.equal(permute_rows(w, heads), w)
    # the inverse transformers applies when it loads a llama GGUF
    rev = getattr(TensorProcessor(), "_reverse_permute_weights", None)
    if rev is not None:
        back = rev(permute_rows(w, 4).numpy(), 4, 4)
        assert np.array_equal(back, w.numpy())


@pytest.mark.parametrize(
    "recipe",
    [
        "rtn(format=gguf-q4_0)",
        "rtn(format=gguf-q8_0)",
        "rtn(format=gguf-q4_k)",  # rows of 64: llama.cpp's fallback, Q5_0
        "rtn(format=mxfp4)",  # OCP MX repacks losslessly into GGUF MXFP4
    ],
)
def test_reader_decodes_written_tensors_to_joules_weights_bit_for_bit(tmp_path, recipe):
    from gguf import GGUFReader, quants

    d, cm = _compressed(tmp_path, recipe)
    res = export_gguf(d, tmp_path / "m.gguf")
    assert res.exact
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    by = {t.name: t for t in reader.tensors}
    n_head, n_kv = 4, 2
    checked = 0
    for name, mod in cm.model.named_modules():
        if not hasattr(mod, "qtensor"):
            continue
        x = next(t for t in res.tensors if t.source == f"{name}.weight")
        t = by[x.name]
        w = torch.from_numpy(quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
        w = w.reshape(mod.out_features, mod.in_features)
        if x.permuted:
            w = unpermute_rows(w, n_head if "attn_q" in x.name else n_kv)
        ours = mod.dequantize_weight().float()
        if "mxfp4" in recipe:  # a -0 code reads back as +0 (equal values, other sign bit)
            assert torch.equal(w, ours)
        else:
            assert torch.equal(w.view(torch.int32), ours.view(torch.int32))
        checked += 1
    assert checked == 14
    if "q4_k" in recipe:
        assert set(res.type_counts()) == {"Q5_0", "F32"}
        layer = cm.manifest.layers["model.layers.0.mlp.down_proj"]
        assert layer["format"] == "gguf-q5_0" and layer["format_requested"] == "gguf-q4_k"
    meta = json.loads(bytes(reader.fields["joules.export"].parts[-1]).decode())
    assert meta["recipe"] == cm.manifest.recipe and meta["exact"]


def test_exported_file_loads_to_the_same_logits(tmp_path):
    d, _ = _compressed(tmp_path, "rtn(format=gguf-q4_1)")
    export_gguf(d, tmp_path / "m.gguf")
    a, b = load_model(d), load_model(tmp_path / "m.gguf")
    text = "The quick brown fox."
    ids = a.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, b.tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_unmappable_format_refused_with_what_maps(tmp_path):
    d, _ = _compressed(tmp_path, "rtn(format=int4-g32)")
    with pytest.raises(ConfigError, match=r"gguf-q4_0.*mxfp4.*--dequantize"):
        export_gguf(d, tmp_path / "m.gguf")
    res = export_gguf(d, tmp_path / "m.gguf", dequantize="f16")
    assert not res.exact and res.type_counts()["F16"] == 14


def test_cli_export_and_one_line_errors_on_bad_gguf(tmp_path):
    d, _ = _compressed(tmp_path, "rtn(format=gguf-q8_0)")
    r = runner.invoke(app, ["export", str(d), "--to", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["export", str(d), "--to", "gguf", "-o", str(tmp_path / "m.gguf"), "--json"]
    )
    out = json.loads(r.stdout)
    assert out["type_counts"]["Q8_0"] == 14 and out["exact"]
    good = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) - 100])
    (tmp_path / "head.gguf").write_bytes(good[:300])
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04 not a gguf file at all")
    for bad in ("trunc.gguf", "head.gguf", "foreign.gguf"):
        p = str(tmp_path / bad)
        for args in (
            ["export", p, "-o", str(tmp_path / "x.gguf")],
            ["compress", p, "-r", "rtn(format=gguf-q8_0)", "-o", str(tmp_path / "xx")],
        ):
            r = runner.invoke(app, args)
            assert r.exit_code == 2, (bad, args[0], r.output)
            lines = [x for x in r.output.strip().splitlines() if x.strip()]
            assert len(lines) == 1 and "not a readable GGUF" in lines[0], r.output
        with pytest.raises(UnsupportedModelError):
            load_model(p)


def test_gptq_targets_gguf_formats_and_exports_exactly(tmp_path):
    # GPTQ rounds with the GGUF block parameters fixed (Format.fit); what it stores is what
    # llama.cpp decodes: the exported tensors read back to the compressed model's weights
    from gguf import GGUFReader, quants

    from joules.compress import calibration_tokens

    m, tok, _ = tiny_model("llama", seed=0, hidden_size=256, intermediate_size=512)
    calib, _ = calibration_tokens(tok, n=4, length=64)
    cm = compress(m, "gptq(format=gguf-q4_k)", calibration=calib)
    assert {v["format"] for v in cm.manifest.layers.values()} == {"gguf-q4_k"}
    cm.save(tmp_path / "c", tok)
    res = export_gguf(tmp_path / "c", tmp_path / "m.gguf")
    by = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    x = next(t for t in res.tensors if t.source.endswith("layers.1.mlp.down_proj.weight"))
    t = by[x.name]
    w = quants.dequantize(np.asarray(t.data), t.tensor_type)
    mod = cm.model.get_submodule("model.layers.1.mlp.down_proj")
    assert t.tensor_type.name == "Q4_K"
    assert np.array_equal(w.view(np.int32), mod.dequantize_weight().float().numpy().view(np.int32))


def test_output_head_type_quantizes_an_untied_float_head(tmp_path):
    # (it was ignored: an untied head is a linear, which the parameter pass never saw)
    from gguf import GGUFReader, quants

    from joules import formats

    d, cm = _compressed(tmp_path, "rtn(format=gguf-q4_0)", hidden_size=256, intermediate_size=512)
    res = export_gguf(d, tmp_path / "m.gguf", output_head="gguf-q6_k")
    head = next(t for t in res.tensors if t.name == "output.weight")
    assert (head.ggml_type, head.exact, head.source) == ("Q6_K", False, "lm_head.weight")
    t = {x.name: x for x in GGUFReader(str(tmp_path / "m.gguf")).tensors}["output.weight"]
    got = quants.dequantize(np.asarray(t.data), t.tensor_type)
    want = formats.get("gguf-q6_k").fake_quant(cm.model.lm_head.weight.detach().float())
    assert np.array_equal(got.reshape(want.shape), want.numpy())
    with pytest.raises(ConfigError, match="--output-head 'int4-g32'"):
        export_gguf(d, tmp_path / "x.gguf", output_head="int4-g32")
    tied, _ = _compressed(tmp_path / "t", "rtn(format=gguf-q4_0)", tie_word_embeddings=True)
    res = export_gguf(tied, tmp_path / "t.gguf", output_head="gguf-q6_k")
    assert "output.weight" not in {x.name for x in res.tensors}  # llama.cpp reads token_embd
