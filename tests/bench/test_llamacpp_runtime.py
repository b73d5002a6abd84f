"""The ``llamacpp`` bench runtime: a tiny exported GGUF benched end to end by llama.cpp with the
fake meter; a torch model or a compressed directory is a one-line error naming the export."""

from __future__ import annotations

import time

import pytest
import torch

from joules.bench import BenchConfig, MachineLimits, run_bench
from joules.errors import ConfigError
from joules.measure import Meter
from joules.testing.measure import FakeBackend

pytest.importorskip("llama_cpp")

WATTS = 10.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from joules.compress import compress
    from joules.deploy import export_gguf
    from joules.models import tiny_model

    d = tmp_path_factory.mktemp("llrt")
    m, tok, _ = tiny_model("llama", seed=0)
    compress(m, "rtn(format=gguf-q4_0)").save(d / "c", tok)
    export_gguf(d / "c", d / "m.gguf", embedding="gguf-q8_0")
    return d


def test_gguf_benches_end_to_end_through_llamacpp(exported, monkeypatch):
    from gguf import GGUFReader

    from joules.bench.runtimes import get_runtime
    from joules.models import load_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(exported / "cache"))
    # flash attention off so llama.cpp's greedy tokens can be compared with torch's below: its
    # F16 arithmetic (llama.cpp's default, the runtime's) flips near-ties of a random tiny model
    monkeypatch.setattr(get_runtime("llamacpp"), "flash_attn", False)
    path, tok, info = get_runtime("llamacpp").load(exported / "m.gguf")
    assert path == exported / "m.gguf"  # the file itself, not a torch module
    backend = FakeBackend({"cpu": WATTS}, clock=time.monotonic, method="estimated")
    meter = Meter([backend], clock=time.monotonic, interval_s=None, idle_power_w=None)
    lim = MachineLimits("test cpu", 1, 10e9, 12e9, {"fp32": 50e9})
    cfg = BenchConfig(prompt_lens=(12,), gen_len=6, repeats=2, warmup=1, runtime="llamacpp")
    res = run_bench(path, tok, info, cfg, meter=meter, limits=lim)
    r = res.rows[0]
    tensors = GGUFReader(str(path)).tensors
    two_d = [t for t in tensors if len([d for d in t.shape if d > 1]) >= 2]
    # every 2-D tensor as stored: Q4_0 linears, the Q8_0 embedding, the untied F32 head
    n_q4 = sum(t.tensor_type.name == "Q4_0" for t in two_d)
    assert n_q4 == 2 * 7
    assert res.linear_paths == {"llamacpp:Q4_0": n_q4, "llamacpp:Q8_0": 1, "llamacpp:F32": 1}
    assert sum(res.linear_paths.values()) == len(two_d)
    assert r.model_bytes == sum(int(t.n_bytes) for t in tensors)
    assert r.kv_bytes == 2 * info.layers * info.kv_heads * info.head_dim * (12 + 6) * 2
    assert r.decode_tok_s > 0 and r.prefill_tok_s > 0 and len(r.tokens) == 6
    embd = next(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    kv = 2 * info.layers * info.kv_heads * info.head_dim * 15 * 2  # mid-decode context, F16
    sol = lim.read_bw_bytes_s / (r.model_bytes - embd + kv)  # untied: one embedding row read
    assert r.decode_sol_tok_s == pytest.approx(sol)
    assert r.decode_sol_fraction == pytest.approx(r.decode_tok_s / sol)
    # energy through the meter's windows: the fake draws WATTS, phases add up to each run
    de = r.decode_energy
    assert de.method == "estimated" and de.tokens == 5
    for j, dt in zip(de.energy_j, de.duration_s, strict=True):
        assert j == pytest.approx(WATTS * dt, rel=1e-6) and dt > 0
    for pre, dec, run in zip(r.prefill_energy.energy_j, de.energy_j, r.run_energy_j, strict=True):
        assert pre + dec <= run + 1e-9
    # the tokens are llama.cpp's greedy choice, the same as the torch path on these weights
    lm = load_model(exported / "c")
    from joules.bench.runner import bench_prompts

    ids = bench_prompts(tok, 12, 1, cfg.seed)
    ref = lm.model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert r.tokens == ref[0, 12:].tolist()
    assert any("llama.cpp ran m.gguf" in n for n in res.notes)


def test_non_gguf_is_one_line_error_naming_the_export(exported):
    from joules.bench.runtimes import get_runtime
    from joules.models import tiny_model

    with pytest.raises(ConfigError) as e:
        get_runtime("llamacpp").load(exported / "c")
    assert "\n" not in str(e.value) and "joules export DIR --to gguf" in str(e.value)
    m, tok, info = tiny_model("llama", seed=0)
    cfg = BenchConfig(prompt_lens=(8,), gen_len=3, repeats=1, runtime="llamacpp")
    with pytest.raises(ConfigError, match="joules export DIR --to gguf"):
        run_bench(m, tok, info, cfg, probe_if_missing=False)


def test_cli_bench_runtime_llamacpp(exported, monkeypatch):
    import json

    from typer.testing import CliRunner

    from joules.cli import app

    monkeypatch.setenv("JOULES_CACHE_DIR", str(exported / "cache"))
    runner = CliRunner()
    args = ["--prompt-len", "8", "--gen-len", "3", "--repeats", "1", "--json"]
    r = runner.invoke(app, ["bench", str(exported / "m.gguf"), "--runtime", "llamacpp", *args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["runtime"] == "llamacpp"
    bad = runner.invoke(app, ["bench", str(exported / "c"), "--runtime", "llamacpp", *args])
    assert bad.exit_code == 2 and "joules export DIR --to gguf" in bad.output


def test_torch_runtimes_unchanged_by_the_seam():
    from joules.models import tiny_model

    m, tok, info = tiny_model("llama", seed=0)
    res = run_bench(
        m,
        tok,
        info,
        BenchConfig(prompt_lens=(8,), gen_len=3, repeats=1, energy=False),
        probe_if_missing=False,
    )
    assert res.linear_paths == {"dense": sum(isinstance(x, torch.nn.Linear) for x in m.modules())}
