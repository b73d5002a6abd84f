"""What a result depends on besides its inputs: joules' code, the libraries, the machine, the model.

    >>> from joules.fingerprint import code_fingerprint, compute_identity, library_versions
    >>> len(code_fingerprint())
    64
    >>> library_versions()["joules_code"] == code_fingerprint()[:16]
    True
    >>> sorted(compute_identity())
    ['arch', 'cpu_flags', 'device', 'env']
    >>> model_identity("/path/to/model.gguf")["sha256"]           # doctest: +SKIP
    'c0ffee...'

Every run and cache key hashes these beside its inputs, so a result is reused only when the
numbers could not have changed:

* :func:`code_fingerprint` hashes the joules package as the interpreter sees it (each module's
  AST with docstrings dropped; comments and formatting never reach the AST) and the shipped data
  files that feed numbers (WikiText-2 and HellaSwag text, the hardware catalog, grid intensity,
  model configs). An editable install counts: editing a function re-runs a sweep, rewording a
  comment does not. It is a property of the code, so ``joules 0.1.0`` need not change.
* :func:`library_versions`: Python and every library that touches the numbers.
* :func:`compute_identity`: the CPU's compute-relevant ISA flags (they pick kernels and bf16
  paths) and the settings that force a compute path. Thread counts are left out: they change
  speed, not values, and a key that changed with them would re-run a sweep on a busier machine.
* :func:`model_identity`: a model by content (size and sha256 of each weight, config and
  tokenizer file), cached on disk by (path, size, mtime) so a 100 MB file is hashed once.

This module sits on the ground floor: it imports nothing from joules' upper layers (a preset
name is resolved to its file by the caller, e.g. ``joules.models.loading.model_identity``).
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from joules.paths import cache_dir
from joules.serialize import atomic_write_json, to_jsonable
from joules.system import cpu_flags

# The package whose code is fingerprinted: src/joules in an editable install, site-packages/joules
# otherwise. Tests point it at a copy.
SOURCE_ROOT = Path(__file__).resolve().parent

# Shipped files that are documentation, not inputs to any number.
_DOC_SUFFIXES = (".md", ".rst", ".txt.license")

# Libraries whose version can change a figure (kernels, tokenization, GGUF reading, numerics).
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "gguf",
    "torchao",
    "numpy",
    "safetensors",
)
# Recorded only where installed: joules runs without them, and installing one must not re-run
# every sweep whose runs never used it.
OPTIONAL_LIBRARIES = ("llama-cpp-python",)

# Environment variables that force a compute path (and so can change values).
COMPUTE_ENV = ("JOULES_KERNELS", "JOULES_KERNEL_DTYPE")

# The files of a model directory that decide its numbers: weights, configs, tokenizer, the
# joules manifest. READMEs, licences and pickle weights (never loaded) are left out.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.gguf",
    "*config.json",
    "tokenizer.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.jinja",
    "joules.json",
    "joules_*.json",
)


def sha(obj: Any, n: int = 64) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; tuples as lists), first ``n`` hex digits."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------------------------
# Code
# ----------------------------------------------------------------------------------------------


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every bare string statement (module, class and function docstrings, attribute
    docstrings): they never run. An emptied body becomes ``pass``, as an empty one must."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            stmts = getattr(node, name, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                kept = [s for s in stmts if not _is_docstring(s)]
                if len(kept) != len(stmts):
                    setattr(node, name, kept or [ast.Pass()])
    return tree


def source_digest(text: str) -> str:
    """sha256 of Python source as code: comments, docstrings and layout do not count.

    Source that does not parse is hashed as text (it changes the fingerprint on every edit)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return hashlib.sha256(b"text\0" + text.encode()).hexdigest()
    dumped = ast.dump(_strip_docstrings(tree), include_attributes=False)
    return hashlib.sha256(dumped.encode()).hexdigest()


def _package_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.endswith((".pyc", ".pyo", *_DOC_SUFFIXES)):
                continue
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def source_fingerprint(root: str | Path) -> str:
    """sha256 over a package directory: each ``.py`` by :func:`source_digest`, every other file
    (shipped data) by its bytes, each under its relative path (a moved module counts)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in _package_files(root):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".py":
            digest = source_digest(path.read_text(encoding="utf-8", errors="surrogateescape"))
        else:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


_FINGERPRINTS: dict[Path, str] = {}


def code_fingerprint() -> str:
    """The fingerprint of the joules code running now (computed once per process; ~0.5 s)."""
    root = SOURCE_ROOT
    if root not in _FINGERPRINTS:
        _FINGERPRINTS[root] = source_fingerprint(root)
    return _FINGERPRINTS[root]


# ----------------------------------------------------------------------------------------------
# Libraries and machine
# ----------------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Python, every library that touches the numbers, and ``joules_code`` (the first 16 hex
    digits of :func:`code_fingerprint`); ``joules`` is the package version, for people."""
    out = {
        "python": platform.python_version(),
        "joules": _version("joules") or "not installed",
        "joules_code": code_fingerprint()[:16],
    }
    for name in LIBRARIES:
        out[name] = _version(name) or "not installed"
    for name in OPTIONAL_LIBRARIES:
        v = _version(name)
        if v is not None:
            out[name] = v
    return out


def compute_identity(device: str = "cpu") -> dict[str, Any]:
    """The compute path results come from: device, CPU architecture, the ISA flags that pick
    kernels (``joules.system.cpu_flags``), and the environment settings that force a path."""
    return {
        "device": device,
        "arch": platform.machine().lower(),
        "cpu_flags": cpu_flags(),
        "env": {k: os.environ[k] for k in COMPUTE_ENV if os.environ.get(k)},
    }


def compute_label(identity: dict[str, Any] | None = None) -> str:
    """:func:`compute_identity` as one line: ``cpu x86_64 avx2,fma; JOULES_KERNELS=0``."""
    c = identity if identity is not None else compute_identity()
    env = " ".join(f"{k}={v}" for k, v in sorted(c.get("env", {}).items()))
    line = f"{c.get('device')} {c.get('arch')} {','.join(c.get('cpu_flags', [])) or 'no-flags'}"
    return f"{line}; {env}" if env else line


def environment() -> dict[str, Any]:
    """What every key holds beside its inputs: library versions (code fingerprint included)
    and the compute identity."""
    return {"versions": library_versions(), "compute": compute_identity()}


def cache_key(inputs: Any, n: int = 16) -> str:
    """A cache key for ``inputs`` (plain JSON values) made here: inputs + :func:`environment`.

    For scripts' caches (``benchmarks/*.py``); pass the model as :func:`model_identity` and a recipe
    with its defaults expanded, so neither a new default nor new weights reuse an old entry."""
    return sha({"inputs": inputs, **environment()}, n)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _identity_cache_path() -> Path:
    return cache_dir() / "file_sha256.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256) of a file, cached by (resolved path, size, mtime_ns, ctime_ns,
    inode): a 100 MB GGUF file is hashed once (~0.2 s), not on every sweep."""
    p = Path(path).resolve()
    st = p.stat()
    cache_path = _identity_cache_path()
    cache = _read_cache(cache_path)
    # ctime and inode too: a file replaced (renamed over) or rewritten within one mtime tick
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    hit = cache.get(str(p))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return st.st_size, hit["sha256"]
    with open(p, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    cache = _read_cache(cache_path)  # another process may have written meanwhile
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # forget deleted files
    cache[str(p)] = {"stamp": stamp, "sha256": digest}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path, cache, indent=None, sort_keys=True)
    except OSError:  # a read-only cache only costs hashing again
        pass
    return st.st_size, digest


def model_files(path: str | Path) -> list[Path]:
    """The files that decide a model's numbers: the file itself, or a directory's weights,
    configs, tokenizer and joules manifest (:data:`MODEL_FILE_PATTERNS`, top level)."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(
        f
        for f in p.iterdir()
        if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in MODEL_FILE_PATTERNS)
    )


def model_identity(path: str | Path) -> dict[str, Any]:
    """A model file or directory by content: ``{"sha256", "bytes", "files": {name: [bytes,
    sha256]}}``. ``sha256`` covers sizes and contents (and, in a directory, file names), never
    the path: a copy or a renamed GGUF file is the same model."""
    p = Path(path)
    files = {f.name: list(file_sha256(f)) for f in model_files(p)}
    return {
        "sha256": sha(files if p.is_dir() else list(files.values())),
        "bytes": sum(size for size, _ in files.values()),
        "files": files,
    }


__all__ = [
    "COMPUTE_ENV",
    "LIBRARIES",
    "SOURCE_ROOT",
    "cache_key",
    "code_fingerprint",
    "compute_identity",
    "compute_label",
    "environment",
    "file_sha256",
    "library_versions",
    "model_files",
    "model_identity",
    "sha",
    "source_digest",
    "source_fingerprint",
]
