"""Which runtime evaluates or benches a model when the user names none: llama.cpp for a large one.

    >>> from joules.deploy.runtime_choice import pick_llamacpp
    >>> choice = pick_llamacpp("llama-8b-q4/")   # a compressed directory  # doctest: +SKIP
    >>> choice.note                                                         # doctest: +SKIP
    '8.0B parameters: running it through llama.cpp ...'
    >>> choice.ready()        # its streamed GGUF export, made once         # doctest: +SKIP

A torch forward of a large model on a CPU takes hours for one evaluation (issue 29: a bf16
forward of an 8B model on a CPU without native bf16), while llama.cpp runs the GGUF file's own
block types. So ``joules eval`` (wikitext2, deviation) and ``joules bench`` without
``--runtime`` run a model of :data:`LARGE_PARAMS` parameters or more through llama.cpp: a
``.gguf`` file as it is, a compressed directory whose layers GGUF holds exactly through its
streamed export (made once, kept in the joules cache under ``gguf/``), and the CLI says so in
one line. A smaller model, an HF directory, a directory in formats GGUF cannot hold, or a
machine without llama-cpp-python stay on torch.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from joules import fingerprint
from joules.compress import read_manifest
from joules.compress.manifest import MANIFEST_FILE
from joules.deploy.gguf_export import export_gguf, gguf_exact
from joules.deploy.llamacpp import gguf_tensor_table
from joules.models.loading import resolve
from joules.paths import cache_dir

# The Llama-3.2-3B shape and up (not measured here: a threshold, patched in tests).
LARGE_PARAMS = 3_000_000_000
# A float embedding and untied head in the export llama.cpp runs: as llama-quantize's presets
# store a model's output tensor (and the sweep's [deploy] defaults), not F32 (4.2 GB for an 8B
# model's 128k x 4096 pair, more than half its Q4_0 blocks)
HEAD_TYPE = "gguf-q6_k"
# No GGUF type stores fewer bits per weight (IQ1_S: 1.56): a smaller file is not large.
_MIN_BITS_PER_PARAM = 1.5
_HEAD_NOTE = "a float embedding and head as Q6_K, as llama-quantize stores them"
_WHY = (
    "running it through llama.cpp, as a torch forward of a model this size on a CPU takes "
    "hours (--runtime torch forces torch)"
)


@dataclass(frozen=True)
class LlamaCppChoice:
    """The GGUF file llama.cpp runs for a model (``source``: the compressed directory it is
    exported from, if any), and the line that says why."""

    path: Path
    parameters: int
    note: str
    source: Path | None = None

    def ready(self) -> Path:
        """The file, exported now (streamed) if it is a directory's and not kept yet: a float
        embedding and untied head as :data:`HEAD_TYPE` unless the directory plans their types."""
        if self.source is not None and not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            planned = read_manifest(self.source).gguf_export or {}
            export_gguf(
                self.source,
                self.path,
                embedding=planned.get("embedding") or HEAD_TYPE,
                output_head=planned.get("output") or HEAD_TYPE,
            )
        return self.path


def exported_path(directory: Path) -> Path:
    """Where the streamed export of compressed ``directory`` is kept: keyed by its path and its
    manifest (written last by every save, so a rewritten directory gets a new file)."""
    st = (directory / MANIFEST_FILE).stat()
    key = fingerprint.sha([str(directory.resolve()), st.st_size, st.st_mtime_ns], 12)
    return cache_dir() / "gguf" / f"{directory.resolve().name}-{key}.gguf"


def pick_llamacpp(spec: str | os.PathLike[str]) -> LlamaCppChoice | None:
    """The llama.cpp file for ``spec`` when it should run there (see the module docstring),
    else None. Nothing is exported yet (:meth:`LlamaCppChoice.ready`)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    kind, path = resolve(spec)
    if kind == "gguf":
        if path.stat().st_size * 8 < LARGE_PARAMS * _MIN_BITS_PER_PARAM:
            return None
        n = sum(t[2] for t in gguf_tensor_table(path))
        if n < LARGE_PARAMS:
            return None
        return LlamaCppChoice(path, n, f"{n / 1e9:.1f}B parameters: {_WHY}")
    if kind != "joules":
        return None
    n = int(read_manifest(path).model_parameters or 0)
    if n < LARGE_PARAMS or not gguf_exact(path):
        return None
    out = exported_path(path)
    note = f"{n / 1e9:.1f}B parameters: {_WHY}; on its GGUF export {out} ({_HEAD_NOTE})"
    return LlamaCppChoice(out, n, note, path)


def export_note(spec: str | os.PathLike[str]) -> str | None:
    """The line ``joules export`` prints for a large compressed directory: it is streamed."""
    kind, path = resolve(spec)
    if kind != "joules":
        return None
    n = int(read_manifest(path).model_parameters or 0)
    if n < LARGE_PARAMS:
        return None
    return (
        f"{n / 1e9:.1f}B parameters: exporting tensor by tensor from the shards (peak memory: "
        "the largest tensor's working set, not the model)"
    )
