"""llama.cpp through llama-cpp-python: joules' GGUF block bytes equal llama.cpp's own quantizer
(every type, Q4_K and Q6_K included, where the gguf package has no quantizer), and llama.cpp's
perplexity on an exported file matches the torch path's on the same windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from joules import formats
from joules.formats.gguf import BLOCK_TYPES

pytest.importorskip("llama_cpp")
from joules.deploy.llamacpp import ggml_quantize


def _cases(block: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 2 * block
    x = rng.standard_normal((8, n)).astype(np.float32)
    heavy = (rng.standard_t(2, (4, n)) * 0.02).astype(np.float32)
    zero = np.zeros((2, n), np.float32)
    signed_zero = np.where(rng.random((3, n)) < 0.5, 0.0, -0.0).astype(np.float32)
    signed_zero[1, ::5] = 1e-3
    outlier = (rng.standard_normal((3, n)) * 1e-3).astype(np.float32)
    outlier[:, 3] = 25.0
    ties = np.tile(np.linspace(-8, 8, 33, dtype=np.float32)[:32], (2, n // 32))
    sub = (rng.standard_normal((2, n)) * 1e-6).astype(np.float32)
    const = np.full((2, n), 0.25, np.float32)
    # blocks so small that 1/d overflows to inf: llama.cpp's float->int casts of inf/NaN
    tiny = np.float32(1.1754944e-42)
    underflow = np.full((4, n), tiny, np.float32)
    underflow[0, ::32] = 0
    underflow[1, ::3] = -tiny
    underflow[2] = np.float32(1.034e-42)
    underflow[3, ::2] = np.float32(-3e-39)
    half_zero = x[:2].copy()
    half_zero[:, : n // 2 : 2] = 0  # sub-blocks with many exact zeros
    return {
        "random": x,
        "heavy_tailed": heavy,
        "zero": zero,
        "signed_zero": signed_zero,
        "outlier": outlier,
        "ties": ties,
        "subnormal_scale": sub,
        "constant": const,
        "underflow": underflow,
        "half_zero": half_zero,
    }


@pytest.mark.parametrize("t", list(BLOCK_TYPES))
@pytest.mark.parametrize("case", list(_cases(32)))
def test_bytes_equal_llamacpp_quantizer(t, case):
    fmt = formats.get(f"gguf-{t}")
    x = _cases(fmt.bt.block)[case]
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    ref = ggml_quantize(x, fmt.ggml_type)
    assert ours.shape == ref.shape
    diff = np.nonzero((ours != ref).any(axis=1))[0]
    assert diff.size == 0, f"rows {diff[:5]} differ"


@pytest.mark.parametrize("t", list(BLOCK_TYPES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bytes_equal_llamacpp_quantizer_random(t, data):
    fmt = formats.get(f"gguf-{t}")
    rows, nblk = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    scale = data.draw(st.sampled_from([1e-4, 1.0, 100.0]))
    x = data.draw(
        arrays(np.float32, (rows, nblk * fmt.bt.block), elements=st.floats(-8, 8, width=32))
    )
    x = (x * np.float32(scale)).astype(np.float32)
    ours = fmt.quantize(torch.from_numpy(x)).parts["blocks"].numpy()
    assert np.array_equal(ours, ggml_quantize(x, fmt.ggml_type))


WEIGHTED = [t for t, bt in BLOCK_TYPES.items() if bt.weighted]


def _imatrix(k: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    if kind == "skewed":  # as llama-imatrix's mean squared activations are
        return (rng.random(k) ** 6 * 50).astype(np.float32)
    if kind == "dead_columns":
        im = rng.random(k).astype(np.float32)
        im[::3] = 0
        return im
    return np.full(k, 1e-6, np.float32)  # tiny


@pytest.mark.parametrize("t", WEIGHTED)
@pytest.mark.parametrize("case", list(_cases(32)))
@pytest.mark.parametrize("kind", ["skewed", "dead_columns", "tiny"])
def test_bytes_equal_llamacpp_quantizer_with_imatrix(t, case, kind):
    fmt = formats.get(f"gguf-{t}")
    x = _cases(fmt.bt.block)[case]
    im = _imatrix(x.shape[1], kind)
    ours = fmt.quantize(torch.from_numpy(x), imatrix=torch.from_numpy(im)).parts["blocks"]
    ref = ggml_quantize(x, fmt.ggml_type, im)
    diff = np.nonzero((ours.numpy() != ref).any(axis=1))[0]
    assert diff.size == 0, f"rows {diff[:5]} differ"


@pytest.mark.parametrize("t", WEIGHTED)
def test_bytes_equal_llamacpp_quantizer_with_imatrix_on_wide_rows(t):
    # Q4_0/Q5_0's sigma2 is the mean square of the whole row (1,536 here, a down_proj's)
    fmt = formats.get(f"gguf-{t}")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 1536)) * rng.random((1, 1536)) ** 3).astype(np.float32)
    im = _imatrix(1536, "skewed")
    ours = fmt.quantize(torch.from_numpy(x), imatrix=torch.from_numpy(im)).parts["blocks"]
    assert np.array_equal(ours.numpy(), ggml_quantize(x, fmt.ggml_type, im))


@pytest.mark.parametrize("t", WEIGHTED)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bytes_equal_llamacpp_quantizer_with_random_imatrix(t, data):
    fmt = formats.get(f"gguf-{t}")
    rows, nblk = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    k = nblk * fmt.bt.block
    x = data.draw(arrays(np.float32, (rows, k), elements=st.floats(-8, 8, width=32)))
    im = data.draw(arrays(np.float32, (k,), elements=st.floats(0, 1e3, width=32)))
    ours = fmt.quantize(torch.from_numpy(x), imatrix=torch.from_numpy(im)).parts["blocks"]
    assert np.array_equal(ours.numpy(), ggml_quantize(x, fmt.ggml_type, im))


@pytest.mark.parametrize("t", WEIGHTED)
def test_negative_zeros_with_all_the_weight_sum_to_a_positive_zero_scale(t):
    """Found by hypothesis: the only weighted value of the block is -0 (the -1 beside it has
    importance 0), so every weighted sum is a sum of -0 terms; C's ``s = 0; s += ...`` makes
    it +0 and llama.cpp stores the scale +0, where a sum seeded with the first term kept -0."""
    fmt = formats.get(f"gguf-{t}")
    x = np.full((1, fmt.bt.block), -0.0, np.float32)
    x[0, 1] = -1.0
    im = np.zeros(fmt.bt.block, np.float32)
    im[0] = 1.0
    ours = fmt.quantize(torch.from_numpy(x), imatrix=torch.from_numpy(im)).parts["blocks"]
    assert np.array_equal(ours.numpy(), ggml_quantize(x, fmt.ggml_type, im))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_llamacpp_perplexity_matches_torch_on_every_exported_architecture(
    tmp_path, monkeypatch, arch
):
    """A tiny random model of each architecture (qwen2: q/k/v biases, unpermuted NEOX rows;
    qwen3: per-head q/k norms and its own head_dim; mistral: written as llama; gemma3: norms
    shifted by 1, four per block, a sliding-window layer beside a full one), its float and
    GPTQ-IQ4_NL exports evaluated by llama.cpp, equal joules' torch evaluation within 0.5 %."""
    from gguf import GGUFReader

    from joules.compress import calibration_tokens, compress
    from joules.data import load_text
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import llamacpp_perplexity
    from joules.evaluate.perplexity import perplexity
    from joules.models import load_model, save_tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    text = load_text("wikitext2", "test")
    src = save_tiny_model(tmp_path / arch, arch, seed=1)
    lm = load_model(src)
    # a random init's attention is near uniform (q.k ~ 0) and its logits near flat, which would
    # hide a wrong RoPE row order, bias or norm: scale them until they matter
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if n.endswith("bias") or "q_norm" in n or "k_norm" in n:
                # gemma3 normalises q and k after the projection: its q/k norms set the scale
                centre = (3.0 if arch == "gemma3" else 1.0) if "norm" in n else 0.0
                p.copy_(torch.randn_like(p) * 0.5 + centre)
            elif n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(100.0)
            elif n.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.mul_(20.0)
    lm.model.save_pretrained(src)
    calib, _ = calibration_tokens(lm.tokenizer, n=2, length=32)
    m = load_model(src)
    compress(m.model, "gptq(format=gguf-iq4_nl)", calibration=calib).save(
        tmp_path / "c", m.tokenizer
    )
    for name, model_dir in (("f32", src), ("iq4_nl", tmp_path / "c")):
        res = export_gguf(model_dir, tmp_path / f"{name}.gguf")
        kv = GGUFReader(str(tmp_path / f"{name}.gguf")).fields
        want = "llama" if arch == "mistral" else arch
        assert bytes(kv["general.architecture"].parts[-1]).decode() == want
        if arch == "qwen2":
            assert any(t.name == "blk.0.attn_q.bias" for t in res.tensors)
        if arch == "qwen3":
            assert any(t.name == "blk.0.attn_k_norm.weight" for t in res.tensors)
        if arch == "gemma3":
            assert any(t.name == "blk.1.post_ffw_norm.weight" for t in res.tensors)
            swa = kv["gemma3.attention.sliding_window_pattern"]
            assert [bool(swa.parts[i][0]) for i in swa.data] == [True, False]
        a = load_model(model_dir)
        ref = perplexity(a.model, a.tokenizer, text, window=128, limit_tokens=512)
        got = llamacpp_perplexity(
            tmp_path / f"{name}.gguf", a.tokenizer, text, window=128, limit_tokens=512, threads=1
        )
        # measured: F32 files within 4e-5, IQ4_NL within 8e-4; a wrong RoPE row order is
        # 0.5 % (mistral) to 2.6 % (qwen2) off
        tol = 0.001 if name == "f32" else 0.005
        assert abs(got.perplexity / ref.perplexity - 1) < tol, (name, got, ref)


def test_llamacpp_perplexity_matches_torch_on_exported_file(tmp_path, monkeypatch):
    from joules.compress import compress
    from joules.data import load_text
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import llamacpp_decode_speed, llamacpp_perplexity
    from joules.evaluate.perplexity import perplexity
    from joules.models import load_model, tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    text = load_text("wikitext2", "test")
    for spec in ("gguf-q8_0", "gguf-q4_0"):
        m, tok, _ = tiny_model("llama", seed=0)
        cm = compress(m, f"rtn(format={spec})")
        cm.save(tmp_path / spec, tok)
        export_gguf(tmp_path / spec, tmp_path / f"{spec}.gguf")
        a = load_model(tmp_path / spec)
        ref = perplexity(a.model, a.tokenizer, text, window=128, limit_tokens=768)
        got = llamacpp_perplexity(
            tmp_path / f"{spec}.gguf", a.tokenizer, text, window=128, limit_tokens=768, threads=1
        )
        assert got.tokens_scored == ref.tokens_scored and got.windows == ref.windows
        assert abs(got.perplexity / ref.perplexity - 1) < 0.005, (
            spec,
            got.perplexity,
            ref.perplexity,
        )
    speed = llamacpp_decode_speed(
        tmp_path / "gguf-q4_0.gguf", list(range(3, 30)), 8, threads=1, repeats=1
    )
    assert speed.new_tokens == 8 and speed.tpot_s > 0 and speed.decode_tokens_per_s > 0


def test_llamacpp_on_truncated_or_foreign_file_is_one_line_error(tmp_path):
    from joules.deploy.llamacpp import load_llama
    from joules.errors import UnsupportedModelError

    (tmp_path / "foreign.gguf").write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(UnsupportedModelError) as e:
        load_llama(tmp_path / "foreign.gguf")
    assert "\n" not in str(e.value) and "not a readable GGUF" in str(e.value)


def test_cli_eval_runtime_llamacpp(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from joules.cli import app
    from joules.compress import compress
    from joules.deploy import export_gguf
    from joules.models import tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    m, tok, _ = tiny_model("llama", seed=0)
    compress(m, "rtn(format=gguf-q8_0)").save(tmp_path / "c", tok)
    export_gguf(tmp_path / "c", tmp_path / "m.gguf")
    runner = CliRunner()
    args = ["--task", "wikitext2", "--limit-tokens", "300", "--window", "100", "--json"]
    a = runner.invoke(app, ["eval", str(tmp_path / "m.gguf"), *args, "--runtime", "llamacpp"])
    b = runner.invoke(app, ["eval", str(tmp_path / "c"), *args])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    pa, pb = json.loads(a.stdout)["perplexity"], json.loads(b.stdout)["perplexity"]
    assert abs(pa / pb - 1) < 0.005
    r = runner.invoke(
        app, ["eval", str(tmp_path / "c"), "--task", "wikitext2", "--runtime", "llamacpp"]
    )
    assert r.exit_code == 2 and "needs a .gguf file" in r.output


@pytest.mark.parametrize("ftype", ["Q4_0", "IQ4_NL", "IQ4_XS"])
def test_rtn_export_equals_llamacpp_quantized_file_byte_for_byte(tmp_path, monkeypatch, ftype):
    # the whole path: joules compress rtn(gguf-<type>) + export == llama-quantize <type> of the
    # F32 export, tensor for tensor (permuted attn_q/attn_k, the tied embedding as Q6_K)
    from gguf import GGUFReader

    from joules.compress import compress
    from joules.deploy import export_gguf
    from joules.deploy.peer import llamacpp_peer
    from joules.models import load_model, save_tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(hidden_size=256, intermediate_size=512, heads=4, kv_heads=2, tie_word_embeddings=True)
    save_tiny_model(tmp_path / "t", "llama", seed=0, **kw)
    export_gguf(tmp_path / "t", tmp_path / "f32.gguf")
    llamacpp_peer(tmp_path / "f32.gguf", ftype, tmp_path / "llama.gguf", threads=1)
    lm = load_model(tmp_path / "t")
    compress(lm.model, f"rtn(format=gguf-{ftype.lower()})").save(tmp_path / "c", lm.tokenizer)
    export_gguf(tmp_path / "c", tmp_path / "joules.gguf", embedding="gguf-q6_k")
    ref = {t.name: t for t in GGUFReader(str(tmp_path / "llama.gguf")).tensors}
    ours = {t.name: t for t in GGUFReader(str(tmp_path / "joules.gguf")).tensors}
    assert ref.keys() == ours.keys()
    for name, t in ref.items():
        assert t.tensor_type == ours[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(ours[name].data)), name


def test_extra_buffers_are_off_exactly_on_amx_cpus(monkeypatch):
    """llama.cpp's AMX repack crashes llama_decode (seen on a Sapphire Rapids VM): joules keeps
    plain CPU buffers there, and the default (repacked) path everywhere else."""
    import joules.deploy.llamacpp as mod

    monkeypatch.setattr(mod, "cpu_flags", lambda: ["avx2", "avx512f", "amx_tile", "amx_int8"])
    assert not mod.extra_buffers_safe() and "off" in mod.llama_runtime_note()
    monkeypatch.setattr(mod, "cpu_flags", lambda: ["avx", "avx2", "fma", "f16c"])
    assert mod.extra_buffers_safe()


def test_llama_model_params_reach_the_loaded_model(tmp_path):
    pytest.importorskip("llama_cpp")
    from joules.deploy.llamacpp import llama_model_params, load_llama
    from joules.models import smollm2_gguf_path

    with llama_model_params(use_extra_bufts=False):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=64, verbose=False)
    assert llm.model_params.use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored
    del llm
    llm = load_llama(smollm2_gguf_path(), n_ctx=64, threads=1)
    llm.eval([1, 2, 3])  # segfaulted on AMX CPUs before extra buffers were turned off there
