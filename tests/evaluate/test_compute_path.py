"""Quality figures do not depend on the kernels' speed probe: one stated compute path per protocol.

The kernels' activation dtype is chosen for speed by a timing probe (fp32 or bf16 per CPU, and a
loaded machine can flip it). Evaluation never runs a weight-only kernel: compressed linears
decode their weight and multiply densely in the model's dtype (``emulated``), so with the probe
forced either way, or ``JOULES_KERNEL_DTYPE`` set, the figures are identical and the protocol
says which path ran.
"""

from __future__ import annotations

import pytest
import torch

import joules.compress.modules.kernels as K
from joules.compress import compress, linear_paths
from joules.data import load_choice, load_text
from joules.evaluate.choice import choice_accuracy
from joules.evaluate.deviation import deviation
from joules.evaluate.perplexity import perplexity
from joules.models import tiny_model

DECODED = "dense/fp32 x1, emulated x14"  # the int4 weights decoded, dense fp32 matmuls


def _force_probe(monkeypatch: pytest.MonkeyPatch, dtype: str) -> list[str]:
    """The kernels' speed probe answers ``dtype`` (as a CPU with or without fast bf16 would)."""
    calls: list[str] = []

    def probe(kernel_name: str, reps: int = 15) -> K.DtypeChoice:
        calls.append(kernel_name)
        return K.DtypeChoice(kernel_name, dtype, f"forced {dtype}", load={"busy": False})

    monkeypatch.delenv("JOULES_KERNEL_DTYPE", raising=False)
    monkeypatch.setattr(K, "_CHOICES", {})
    monkeypatch.setattr(K, "probe", probe)
    return calls


@pytest.fixture(scope="module")
def int4():
    model, tok, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=int4-g32)")
    return model, tok


def _ppl(model, tok):
    return perplexity(model, tok, load_text("wikitext2", "test"), window=32, limit_tokens=96)


def test_the_probe_really_changes_the_path_outside_evaluation(int4, monkeypatch):
    # the premise: a plain forward (speed work) follows the probe, and the two differ
    model, _ = int4
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in ("bf16", "fp32"):
        _force_probe(monkeypatch, dtype)
        with torch.no_grad():
            out[dtype] = model(ids).logits
        assert linear_paths(model) == {f"kernel:cpu-int4/{dtype}": 14}
    assert not torch.equal(out["bf16"], out["fp32"])


def test_perplexity_is_identical_whichever_dtype_the_probe_picks(int4, monkeypatch):
    model, tok = int4
    results = {}
    for dtype in ("bf16", "fp32"):
        _force_probe(monkeypatch, dtype)
        results[dtype] = _ppl(model, tok)
    a, b = results["bf16"], results["fp32"]
    assert a.window_nll_sums == b.window_nll_sums and a.nll_mean == b.nll_mean
    for r in (a, b):
        assert r.protocol.compute_path == DECODED
        assert r.protocol.activation_dtype.startswith("fp32 (the model's dtype")


def test_choice_and_deviation_are_identical_whichever_dtype_the_probe_picks(int4, monkeypatch):
    model, tok = int4
    items = load_choice("hellaswag")
    ref, _, _ = tiny_model("llama", seed=0)
    text = load_text("wikitext2", "test")
    out = {}
    for dtype in ("bf16", "fp32"):
        _force_probe(monkeypatch, dtype)
        c = choice_accuracy(model, tok, items, limit=3, seed=0)
        d = deviation(model, ref, tok, text, window=32, limit_tokens=64, sqnr_modules="none")
        out[dtype] = (c, d)
    (c1, d1), (c2, d2) = out["bf16"], out["fp32"]
    assert c1.predictions == c2.predictions and c1.correct_norm == c2.correct_norm
    assert d1.kl_mean == d2.kl_mean and d1.nll_model == d2.nll_model
    assert c1.protocol.compute_path == d1.protocol.compute_path == DECODED
    assert d1.protocol.reference_compute_path == "dense/fp32 x15"


def test_an_explicit_kernel_dtype_does_not_change_a_quality_figure(int4, monkeypatch):
    model, tok = int4
    _force_probe(monkeypatch, "fp32")
    pinned = _ppl(model, tok)
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "bf16")
    asked = _ppl(model, tok)
    assert asked.protocol.compute_path == pinned.protocol.compute_path == DECODED
    assert asked.nll_mean == pinned.nll_mean and asked.window_nll_sums == pinned.window_nll_sums


def test_evaluation_never_runs_the_probe(int4, monkeypatch):
    model, tok = int4
    calls = _force_probe(monkeypatch, "bf16")
    _ppl(model, tok)
    assert calls == []


def test_a_bf16_model_evaluates_in_bf16_and_says_so():
    model, tok, _ = tiny_model("llama", seed=0)
    compress(model, "rtn(format=int4-g32)")
    model.to(torch.bfloat16)
    r = _ppl(model, tok)
    assert r.protocol.activation_dtype.startswith("bf16 (the model's dtype")
    assert "emulated x14" in r.protocol.compute_path


# mixed's probe sensitivity runs the whole model's calibration loss, through the int4 attention
RECIPE = (
    "rtn(format=int4-g32, targets=[*.self_attn.*]) | "
    "mixed(avg_bits=[4.5], sensitivity=probe, targets=[*.mlp.*])"
)


def test_compression_is_identical_whichever_dtype_the_probe_picks(monkeypatch):
    # forwards through already-compressed layers during compression: pinned like evaluation
    from joules.compress import calibration_tokens, compressed_linears

    codes = {}
    for dtype in ("bf16", "fp32"):
        calls = _force_probe(monkeypatch, dtype)
        model, tok, _ = tiny_model("llama", seed=0)
        calib, _ = calibration_tokens(tok, n=2, length=16)
        compress(model, RECIPE, calibration=calib)
        codes[dtype] = {n: m.qweight_codes.clone() for n, m in compressed_linears(model).items()}
        assert calls == []  # the loss through the int4 attention never asked the probe
    assert codes["bf16"].keys() == codes["fp32"].keys()
    assert all(torch.equal(codes["bf16"][n], codes["fp32"][n]) for n in codes["fp32"])
