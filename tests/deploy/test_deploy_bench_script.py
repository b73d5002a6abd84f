"""benchmarks/deploy.py: the sweep spec it builds parses with every recipe; joules' rows copy
llama.cpp's per-tensor types; its table and headline come from the JSON alone (a synthetic one
here: nothing is measured)."""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "deploy.py"


def _load(path: Path, name: str) -> Any:
    """A file as a module, as ``python benchmarks/deploy.py`` runs it: its folder first on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


@pytest.fixture(scope="module")
def D() -> Any:
    return _load(SCRIPT, "_bench_deploy")


LAYERS = 30
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _file_types(kind_type, embd: str = "Q8_0") -> dict[str, str]:
    """Per-tensor types of a SmolLM2-shaped GGUF file: ``kind_type(layer, kind)`` per linear."""
    out = {"token_embd.weight": embd, "output_norm.weight": "F32"}
    for i in range(LAYERS):
        out[f"blk.{i}.attn_norm.weight"] = out[f"blk.{i}.ffn_norm.weight"] = "F32"
        for k in KINDS:
            out[f"blk.{i}.{k}.weight"] = kind_type(i, k)
    return out


def _q4_k_m(i: int, k: str) -> str:
    more = i < LAYERS // 8 or i >= 7 * LAYERS // 8 or (i - LAYERS // 8) % 3 == 2
    if k == "ffn_down":
        return "Q6_K" if more else "Q4_K"
    if k == "attn_v":
        return "Q8_0" if more else "Q5_0"  # Q6_K falls back to Q8_0 on 576-wide rows
    return "Q5_0"


# llama.cpp's files without imatrix, as the default model's (types per the vendored llama-quant)
PEER_TYPES = {
    "llamacpp-q8_0": _file_types(lambda i, k: "Q8_0"),
    "llamacpp-q6_k": _file_types(lambda i, k: "Q6_K" if k == "ffn_down" else "Q8_0"),
    "llamacpp-q5_0": _file_types(lambda i, k: "Q5_0"),
    "llamacpp-q4_k_m": _file_types(_q4_k_m),
    "llamacpp-q4_0": _file_types(lambda i, k: "Q4_0"),
    "llamacpp-q4_k_s": _file_types(lambda i, k: "Q5_K" if k == "ffn_down" and i < 3 else "Q5_0"),
    # Q2_K: a stand-in of its kind (Q3_K ffn_down, the Q4_0 fallback on 576-wide rows)
    "llamacpp-q2_k": _file_types(lambda i, k: "Q3_K" if k == "ffn_down" else "Q4_0"),
}
# ... and with an imatrix: Q4_0 guards the first n_layer/8 ffn_down with Q4_1, not Q5_K
PEER_TYPES |= {f"{r}+imatrix": t for r, t in PEER_TYPES.items()}
PEER_TYPES["llamacpp-q4_0+imatrix"] = _file_types(
    lambda i, k: "Q4_1" if k == "ffn_down" and i < 3 else "Q4_0"
)


def _per_module(D, row):
    return D.module_types(PEER_TYPES[row])


def test_the_spec_parses_with_every_recipe(D):
    from joules.sweep import parse_spec

    per = {r: _per_module(D, r) for r in PEER_TYPES}
    recipes = D.row_recipes(D.all_rows(), per)
    presets = [p for p in D.PEER_PRESETS]
    assert "IQ3_XXS" not in presets and len(presets) == 11
    assert all(D.peer_row(p, im) in recipes for p in presets for im in (False, True))
    # a joules row for each preset whose types joules writes (all of these), none without
    mapped = {"Q8_0", "Q6_K", "Q5_0", "Q4_K_M", "Q4_0", "Q4_K_S", "Q2_K"}
    joules = {r for r in recipes if D.parse_row(r)[0] == "joules"}
    assert joules == {D.joules_row(m, p) for m in D.METHODS for p in mapped}
    assert D.unmapped_types({"model.layers.0.mlp.down_proj": "IQ3_S"}) == ["IQ3_S"]
    assert not D.row_recipes(["gptq-q2_k"], {"llamacpp-q2_k+imatrix": {"x.mlp.down_proj": "IQ3_S"}})
    # rtn copies the file without an imatrix, gptq / awq|gptq the one with
    assert recipes["rtn-q4_0"] == "rtn(format=gguf-q4_0)"
    assert recipes["gptq-q4_0"] == (
        'gptq(format=gguf-q4_0, overrides=["model.layers.0.mlp.down_proj=gguf-q4_1", '
        '"model.layers.1.mlp.down_proj=gguf-q4_1", "model.layers.2.mlp.down_proj=gguf-q4_1"])'
    )
    assert D.type_source("awq", "Q4_0") == "llamacpp-q4_0+imatrix"
    assert recipes["rtn-q8_0"] == "rtn(format=gguf-q8_0)"
    assert recipes["llamacpp-q4_0+imatrix"] == "llamacpp(ftype=Q4_0, imatrix=true)"
    settings = dict(tokens=16384, window=512, calib_n=128, calib_len=256, prompt_len=64, gen_len=32)
    text = D.spec_text(settings, list(recipes.values()))
    spec = parse_spec(text, "deploy.toml", check_models=False)
    assert len(spec.recipes) == len(recipes) == 1 + 22 + 21
    assert spec.eval.runtime == "llamacpp" and spec.bench[0].runtime == "llamacpp"
    assert spec.eval.tasks == ("wikitext2", "deviation") and spec.eval.limit_tokens == 16384
    assert spec.deploy is not None and spec.deploy.embedding == "gguf-q6_k"
    assert (spec.calibration.n, spec.calibration.length) == (128, 256) and spec.hardware == ()
    assert spec.bench[0].repeats == 1 and spec.bench[0].prompt_len == 64


@pytest.mark.parametrize("peer", sorted(PEER_TYPES))
def test_joules_recipes_give_every_linear_the_peer_type(D, peer):
    from joules.compress import parse_recipe

    per = _per_module(D, peer)
    default, layout = D.type_layout(per)
    assert all(D.resolve_type(m, default, layout) == t for m, t in per.items())
    gptq = parse_recipe(D.joules_recipe("gptq", per)).steps[0]
    assert all(gptq.format_for(m) == f"gguf-{t.lower()}" for m, t in per.items())
    awq = parse_recipe(D.joules_recipe("awq", per)).steps
    assert [s.name for s in awq] == ["awq", "gptq"] and awq[1] == gptq
    # rtn has no overrides: one step per type on disjoint targets covering every linear
    steps = parse_recipe(D.joules_recipe("rtn", per)).steps
    for m, t in per.items():
        hits = [
            s for s in steps if not s.targets or any(fnmatch.fnmatchcase(m, p) for p in s.targets)
        ]
        assert [s.format for s in hits] == [f"gguf-{t.lower()}"], m
    if peer == "llamacpp-q4_k_m":
        assert default == "Q5_0" and len(steps) == 4 and len(layout) == 14 + 14 + 1


def _row(D, row, mib, kld, ci, p99, tok_s, grid, **kw):
    kind, preset, _ = D.parse_row(row)
    r = {
        "row": row,
        "kind": kind,
        "preset": preset,
        "recipe": "x",
        "status": "done",
        "file": f"/f/{row}.gguf",
        "sha256": row,
        "size_bytes": int(mib * 2**20),
        "file_mib": mib,
        "bits_per_weight": 8 * mib / 135,
        "types": {"Q4_0": 210, "F32": 61, "Q8_0": 1},
        "below_q4_1_grid": mib * 2**20 < grid,
        "kld_mean": kld,
        "kld_mean_ci95": ci,
        "kld_median": kld / 2,
        "kld_p99": p99,
        "kld_max": 5 * p99,
        "same_top_pct": 90.0,
        "ppl_ratio": 1 + kld,
        "ppl_ratio_ci95": [1 + kld - 0.01, 1 + kld + 0.01],
        **kw,
    }
    files = {
        "tok_s": tok_s,
        "j_per_token": [0.05] * len(tok_s),
        "ttft_ms": [300.0] * len(tok_s),
        "energy_method": ["estimated"] * len(tok_s),
    }
    return r, files


@pytest.fixture
def synthetic(D) -> dict[str, Any]:
    grid = int(93.8 * 2**20)
    specs = [
        ("baseline", 513.1, 0.0, [0.0, 0.0], 0.0, [20.0, 21.0, 19.0, 20.5, 20.0]),
        ("llamacpp-q8_0", 138.1, 0.002, [0.0018, 0.0022], 0.02, [60.0, 62, 58, 61, 60]),
        ("rtn-q8_0", 138.1, 0.002, [0.0018, 0.0022], 0.02, [61.0, 60, 59, 60, 61]),
        ("llamacpp-q4_0", 87.5, 0.255, [0.25, 0.26], 2.1, [100.0, 98, 102, 101, 99]),
        ("llamacpp-q4_0+imatrix", 88.0, 0.155, [0.15, 0.16], 1.2, [99.0, 97, 103, 100, 98]),
        ("rtn-q4_0", 87.5, 0.255, [0.25, 0.26], 2.1, [99.0, 99, 101, 100, 100]),
        ("gptq-q4_0", 87.5, 0.083, [0.080, 0.086], 0.58, [101.0, 99, 103, 102, 100]),
        ("llamacpp-iq4_nl+imatrix", 87.8, 0.084, [0.081, 0.087], 0.48, [95.0, 96, 94, 95, 96]),
        ("llamacpp-iq4_xs+imatrix", 87.1, 0.09, [0.087, 0.093], 0.6, [97.0, 96, 98, 97, 96]),
        ("llamacpp-q2_k+imatrix", 84.1, 0.4, [0.39, 0.41], 3.0, [104.0, 103, 105, 104, 103]),
    ]
    rows, files = [], {}
    for row, mib, kld, ci, p99, tok in specs:
        extra = {}
        if D.parse_row(row)[0] == "joules":
            extra = {
                "same_types_as": D.peer_row(D.parse_row(row)[1], False),
                "tensor_type_mismatches": [],
            }
        r, f = _row(D, row, mib, kld, ci, p99, tok, grid, **extra)
        rows.append(r)
        files[row] = f
    return {
        "command": "python benchmarks/deploy.py",
        "machine": {"cpu_flags": ["avx2"]},
        "layout": D.LAYOUT,
        "settings": {"repeats": 5, "prompt_len": 64, "gen_len": 32, "threads": 2, "seed": 0},
        "q4_1_grid_bytes": grid,
        "rows": rows,
        "decode": {"threads": 2, "order": [], "files": files},
        "parity": {
            "row": "gptq-q4_0",
            "torch_perplexity": 26.851,
            "llamacpp_perplexity": 26.907,
            "ratio": 26.907 / 26.851,
            "same_windows": True,
        },
    }


def test_table_and_headline_from_a_synthetic_json(D, synthetic):
    data = D.retable(copy.deepcopy(synthetic))
    t = {r["row"]: r for r in data["table"]}
    assert t["gptq-q4_0"]["kld_mean"] == "0.0830 (0.0800–0.0860)"
    # median 101; mean 101 ± 2.776 × 1.581 / √5 (Student t, 4 degrees of freedom)
    assert t["gptq-q4_0"]["decode_tok_s"] == "101.0 (99.0–103.0)"
    assert t["gptq-q4_0"]["claim"] == "yes" and t["llamacpp-q8_0"]["claim"] == "no"
    assert t["llamacpp-q4_0"]["vs_llamacpp"] is None and t["baseline"]["kind"] == "baseline"
    # paired rounds: per-round ratios 1.01, 1.0102, 1.0098, 1.0099, 1.0101
    vs = data["rows"][[r["row"] for r in data["rows"]].index("gptq-q4_0")]["decode"]["vs_llamacpp"]
    assert vs["peer"] == "llamacpp-q4_0" and vs["rounds"] == 5
    assert vs["ratio"] == pytest.approx(1.01, abs=1e-3) and vs["ci95"][0] > 1.0
    assert t["gptq-q4_0"]["vs_llamacpp"].startswith("1.010 (1.0")
    assert t["gptq-q4_0"]["j_per_token"] == 0.05
    head = data["headline"]
    # Q4_0 class: joules' best (gptq) vs llama.cpp's best imatrix row of the same or larger size
    # (IQ4_NL 87.8 MiB beats Q4_0+imatrix; IQ4_XS is smaller, so not its peer): a KLD tie
    assert head[0].startswith("Q4_0 class (87.5 MiB): joules gptq-q4_0 KLD 0.0830, p99 0.580")
    assert "vs llama.cpp llamacpp-iq4_nl+imatrix (87.8 MiB)" in head[0]
    assert "joules lower, 95 % intervals overlap (a tie); p99 llama.cpp lower" in head[0]
    assert head[1].startswith("no joules row below 87.5 MiB")
    assert "llamacpp-iq4_xs+imatrix 87.1 MiB" in head[1] and "q2_k" in head[1]
    assert len(head) == 2  # Q8_0 is above the Q4_1 grid: no claim


def test_headline_says_when_llamacpp_wins(D, synthetic):
    data = copy.deepcopy(synthetic)
    for r in data["rows"]:
        if r["row"] == "llamacpp-iq4_nl+imatrix":
            r["kld_mean"], r["kld_mean_ci95"] = 0.05, [0.048, 0.052]
    head = D.retable(data)["headline"][0]
    assert "mean KLD llama.cpp lower (95 % intervals apart)" in head


def test_the_block_passes_the_readme_table_check(D, synthetic):
    """The printed block's marker, header and cells satisfy tests/test_readme_tables.py's rule."""
    checker = _load(ROOT / "tests" / "test_readme_tables.py", "_readme_tables")
    data = D.retable(copy.deepcopy(synthetic))
    block = D.markdown(data)
    assert (
        "J/token (estimated)" in block and "- the baseline's weights were Q4_1 (93.8 MiB" in block
    )
    assert "ratio 1.0021, same windows: yes" in block
    [(opts, head, rows, _)] = checker._marked_tables(block)
    assert opts["file"] == "results/deploy.json" and head[0] == "row"
    assert len(rows) == len(data["rows"])
    by = {r["row"]: r for r in data[opts["rows"]]}
    for cells in rows:
        for h, cell in zip(head[1:], cells[1:], strict=True):
            assert checker.check_cell(cell, checker._field(by[cells[0]], opts["cols"][h])) is None
    # a figure the JSON does not hold is caught
    shown = copy.deepcopy(data)
    shown["table"][0]["file_mib"] = 1.0
    wrong = checker._marked_tables(D.markdown(shown))[0][2][0]
    assert wrong[0] == "baseline" and checker.check_cell(wrong[2], by["baseline"]["file_mib"])


def test_splice_replaces_the_committed_block_only(D, synthetic):
    block = D.markdown(D.retable(copy.deepcopy(synthetic)))
    page = (ROOT / "docs" / "results" / "deploy.md").read_text()
    new = D.splice(page, block)
    assert block in new and new.count("<!-- bench: results/deploy.json") == 1
    head, tail = page.split("<!-- bench: results/deploy.json")[0], page.split("\n\n")[-1]
    assert new.startswith(head) and new.endswith(tail)
    assert D.splice(new, block) == new and D.splice("no block\n", block) == "no block\n"


def test_paired_ratio_is_a_t_interval_over_rounds(D):
    r = D.paired_ratio([110.0, 100.0, 90.0], [100.0, 100.0, 100.0])
    assert r["rounds"] == 3 and r["ci95"][0] < r["ratio"] < r["ci95"][1]
    same = D.paired_ratio([50.0, 60.0], [50.0, 60.0])
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]


def test_size_rows_target_the_imatrix_peer_file_or_a_size(D, monkeypatch):
    from types import SimpleNamespace

    assert D.parse_row("size-q2_k") == ("joules", "Q2_K", False)
    assert D.parse_row("size-80.5mib") == ("joules", None, False)
    sizes = {"llamacpp-q2_k+imatrix": 81_000_000}
    assert D.target_bytes("size-q2_k", sizes) == 81_000_000
    assert D.target_bytes("size-80.5mib", {}) == int(80.5 * 2**20)
    assert D.target_bytes("size-q3_k_m", sizes) is None  # its peer has not run
    assert D.target_bytes("gptq-q2_k", sizes) is None
    rows = D.rows_of(SimpleNamespace(rows="size-80.5mib,size-q2_k"))
    assert D.needed_rows(rows) == ["baseline", "llamacpp-q2_k+imatrix", "size-q2_k", "size-80.5mib"]
    monkeypatch.setattr(D, "size_recipe", lambda target: f"gguf_mix(bytes={target - 1000})")
    got = D.row_recipes(["size-q2_k", "size-80.5mib", "size-q3_k_m"], {}, sizes)
    assert got == {
        "size-q2_k": "gguf_mix(bytes=80999000)",
        "size-80.5mib": f"gguf_mix(bytes={int(80.5 * 2**20) - 1000})",
    }
    with pytest.raises(SystemExit, match="unknown rows"):
        D.rows_of(SimpleNamespace(rows="size-80mb"))


def test_quick_and_row_flags(D):
    from types import SimpleNamespace

    assert D.rows_of(SimpleNamespace(rows="all")) == D.all_rows()
    needed = D.needed_rows(D.rows_of(SimpleNamespace(rows="gptq-q4_k_m")))
    assert needed == ["baseline", "llamacpp-q4_k_m+imatrix", "gptq-q4_k_m"]
    needed = D.needed_rows(D.rows_of(SimpleNamespace(rows="rtn-q4_0")))
    assert needed == ["baseline", "llamacpp-q4_0", "rtn-q4_0"]
    assert set(D.QUICK_ROWS) <= set(D.all_rows())
    with pytest.raises(SystemExit, match="unknown rows"):
        D.rows_of(SimpleNamespace(rows="gptq-q4_2"))


def test_q4_k_m_recipes_reproduce_llamacpp_type_mix(D, tmp_path, monkeypatch):
    """On a tiny model whose rows take K-quants: joules' gptq and rtn recipes built from
    llama.cpp's Q4_K_M file give a file of its types, tensor for tensor."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from joules.compress import calibration_tokens, compress
    from joules.deploy import export_gguf
    from joules.deploy.llamacpp import quantize_file
    from joules.models import load_model, save_tiny_model

    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(hidden_size=256, intermediate_size=512, heads=4, kv_heads=2, tie_word_embeddings=True)
    save_tiny_model(tmp_path / "t", "llama", seed=0, layers=4, **kw)
    export_gguf(tmp_path / "t", tmp_path / "f32.gguf")
    quantize_file(tmp_path / "f32.gguf", tmp_path / "peer.gguf", "Q4_K_M", threads=1)
    ref = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "peer.gguf")).tensors}
    per = D.module_types(ref)
    assert len(set(per.values())) >= 2
    lm = load_model(tmp_path / "t")
    calib, _ = calibration_tokens(lm.tokenizer, n=2, length=16)
    for method in ("gptq", "rtn"):
        recipe = D.joules_recipe(method, per)
        out = tmp_path / method
        compress(lm.model, recipe, calibration=calib).save(out, lm.tokenizer)
        emb = ref["token_embd.weight"].lower()
        export_gguf(out, tmp_path / f"{method}.gguf", embedding=f"gguf-{emb}")
        ours = GGUFReader(str(tmp_path / f"{method}.gguf")).tensors
        assert {t.name: t.tensor_type.name for t in ours} == ref, method
        lm = load_model(tmp_path / "t")  # compress changed the model in place


def test_doctests(D):
    import doctest

    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_curve_lines_compare_target_size_files_with_imatrix_points(D):
    def row(name, kind, mib, kld, p99, ppl, ci=None):
        return {"row": name, "kind": kind, "size_bytes": int(mib * 2**20), "file_mib": mib,
                "kld_mean": kld, "kld_mean_ci95": ci, "kld_p99": p99, "ppl_ratio": ppl}  # fmt: skip

    data = {
        "q4_1_grid_bytes": int(93.8 * 2**20),
        "rows": [
            row("llamacpp-q2_k+imatrix", "peer+imatrix", 80.0, 0.30, 1.5, 1.20, [0.29, 0.31]),
            row("llamacpp-q4_0+imatrix", "peer+imatrix", 87.6, 0.17, 0.8, 1.07, [0.16, 0.18]),
            row("llamacpp-q8_0+imatrix", "peer+imatrix", 140.0, 0.01, 0.1, 1.00),  # above grid
            row("size-q2_k", "joules", 79.9, 0.12, 0.75, 1.06, [0.11, 0.13]),
            row("size-q4_0", "joules", 87.5, 0.18, 0.7, 1.05, [0.17, 0.19]),
        ],
    }
    lines = D.curve_lines(data)
    assert len(lines) == 3
    assert "llamacpp-q2_k+imatrix" in lines[0] and "joules lower (95 % intervals apart)" in lines[0]
    # at Q4_0's size the best target-size file of that size or smaller is size-q2_k (0.12)
    assert "joules size-q2_k" in lines[1] and "joules lower" in lines[1]
    assert lines[2].startswith("target-size curve (2 files: 79.9, 87.5 MiB)")
    assert "than 2 of the 2 llama.cpp imatrix files" in lines[2]
    data["rows"][3]["kld_p99"] = 1.0  # a worse tail than Q4_0's (0.8), not than Q2_K's (1.5)
    assert "than 1 of the 2" in D.curve_lines(data)[-1]
    assert D.curve_lines({"q4_1_grid_bytes": 1, "rows": []}) == []
