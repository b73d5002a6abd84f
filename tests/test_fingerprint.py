"""Keys that change when the numbers could: code fingerprint, versions, compute, model content."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from joules import fingerprint
from joules.fingerprint import (
    code_fingerprint,
    compute_identity,
    file_sha256,
    library_versions,
    model_identity,
    source_digest,
)


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the joules package that the fingerprint reads instead of the real one."""
    root = tmp_path / "joules"
    shutil.copytree(
        fingerprint.SOURCE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", root)
    monkeypatch.setattr(fingerprint, "_FINGERPRINTS", {})
    return root


def _refingerprint(monkeypatch) -> str:
    monkeypatch.setattr(fingerprint, "_FINGERPRINTS", {})  # a new process would recompute
    return code_fingerprint()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_comment_and_docstring_edits_keep_the_fingerprint(package_copy, monkeypatch):
    before = code_fingerprint()
    src = package_copy / "fingerprint.py"
    _edit(src, "# Libraries whose version can change a figure", "# Libraries that move numbers")
    _edit(src, '"""sha256 of ``obj`` as canonical JSON', '"""Reworded: the sha256 of ``obj``')
    _edit(src, "from __future__ import annotations\n", "from __future__ import annotations\n\n\n")
    assert _refingerprint(monkeypatch) == before


def test_editing_joules_code_or_shipped_data_changes_the_fingerprint(package_copy, monkeypatch):
    before = code_fingerprint()
    versions_before = library_versions()["joules_code"]
    # a changed default, the kind of edit that left stale results "already done"
    _edit(
        package_copy / "fingerprint.py",
        "def sha(obj: Any, n: int = 64)",
        "def sha(obj: Any, n: int = 32)",
    )
    after_code = _refingerprint(monkeypatch)
    assert after_code != before
    assert library_versions()["joules_code"] == after_code[:16] != versions_before
    # the evaluation text is an input to every perplexity
    with open(package_copy / "data" / "wikitext2" / "test.txt", "a") as f:
        f.write(" one more word")
    assert _refingerprint(monkeypatch) not in (before, after_code)


def test_source_digest_ignores_docstrings_comments_and_layout_only():
    base = 'def f(x):\n    """Doc."""\n    return x + 1  # add one\n'
    assert source_digest(base) == source_digest("def f(x):\n\n    return x+1\n")
    assert source_digest(base) == source_digest(
        'def f(x):\n    """Other doc."""\n    return x + 1\n'
    )
    assert source_digest(base) != source_digest('def f(x):\n    """Doc."""\n    return x + 2\n')
    # a function whose body is only a docstring still differs from one that returns something
    assert source_digest('def g():\n    """Doc."""\n') != source_digest("def g():\n    return 1\n")
    # a string that is a value, not a docstring, counts
    assert source_digest('X = "a"\n') != source_digest('X = "b"\n')


def test_library_versions_name_every_library_that_touches_the_numbers():
    v = library_versions()
    for name in ("python", "joules_code", *fingerprint.LIBRARIES):
        assert v[name], name
    assert v["torch"] != "not installed" and v["transformers"] != "not installed"


def test_compute_identity_holds_cpu_flags_and_forced_paths_not_threads(monkeypatch):
    import torch

    from joules.system import cpu_flags

    ident = compute_identity()
    assert ident["cpu_flags"] == cpu_flags() and ident["device"] == "cpu"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        assert compute_identity() == ident  # speed, not values: never in the key
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("JOULES_KERNEL_DTYPE", "bf16")
    assert compute_identity() != ident


def test_model_identity_is_by_content_and_cached_by_path_size_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    a = tmp_path / "a" / "m.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    b = tmp_path / "b" / "renamed.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    ida = model_identity(a)
    assert ida["sha256"] == model_identity(b)["sha256"]  # a copy is the same model
    assert ida["bytes"] == a.stat().st_size

    # the cache answers without reading the file again
    def no_read(*args, **kwargs):
        raise AssertionError("hashed again despite an unchanged path, size and mtime")

    monkeypatch.setattr(fingerprint.hashlib, "file_digest", no_read)
    assert model_identity(a) == ida
    monkeypatch.undo()
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    # new weights at the same path (same size): a new identity
    data = bytearray(a.read_bytes())
    data[10] ^= 0xFF
    a.write_bytes(bytes(data))
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1_000_000))
    assert model_identity(a)["sha256"] != ida["sha256"]
    assert file_sha256(a)[0] == len(data)


def test_model_identity_of_a_directory_covers_weights_config_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "hf"
    d.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        (d / name).write_text(name)
    ident = model_identity(d)
    assert set(ident["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    (d / "README.md").write_text("reworded")
    assert model_identity(d) == ident
    (d / "tokenizer.json").write_text("another tokenizer")
    assert model_identity(d)["sha256"] != ident["sha256"]


def test_a_preset_is_identified_by_the_file_that_ships_it(monkeypatch, tmp_path):
    from joules.models import loading

    f = tmp_path / "SmolLM2.gguf"
    f.write_bytes(b"GGUF weights")
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(loading.PRESETS, "smollm2-135m", lambda: f)
    ident = loading.model_identity("smollm2-135m")
    assert ident["kind"] == "gguf" and ident["sha256"] == model_identity(f)["sha256"]


_KEY_SCRIPT = """
import json, sys
from joules.sweep.runner import key_env
from joules.sweep.spec import parse_spec
spec = parse_spec(open(sys.argv[1]).read(), check_models=False)
env = key_env(spec)
print(json.dumps([cfg.key(env) for cfg in spec.runs()]))
"""


def test_the_same_inputs_give_the_same_keys_in_separate_processes(tiny_dir, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'models = ["{tiny_dir}"]\n'
        'recipes = ["baseline", "mixed(avg_bits=4.25)", "gptq(format=int4-g64)"]\n'
        "[eval]\nlimit_tokens = 512\n[bench]\nprompt_len = [16]\ngen_len = 4\n"
    )
    env = {**os.environ, "JOULES_CACHE_DIR": str(tmp_path / "cache")}

    def keys() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", _KEY_SCRIPT, str(spec)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = keys()  # hashes the model's files and writes the identity cache
    second = keys()  # reads the identity cache
    assert first == second and len(set(first)) == 3


def test_docstring_examples():
    import doctest

    assert doctest.testmod(fingerprint, optionflags=doctest.ELLIPSIS).failed == 0
