"""Rules read off the source text: nothing in src/ unpickles, and result files are written atomically.

Both scans parse the code (``ast``), so a message or comment that *mentions* pickle (the refusal
in models/loading.py) is not a use, and a use cannot hide behind an alias.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "joules"
BENCH = ROOT / "benchmarks"

# Modules whose loading runs code from the file (pickle and what wraps it).
_PICKLING = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def pickle_uses(source: str) -> list[str]:
    """Each place in ``source`` that imports a pickling module, touches one, or loads a file
    in a way that may unpickle (``torch.load`` without ``weights_only=True``,
    ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``)."""
    found: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name
                if a.name.split(".")[0] in _PICKLING:
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            for a in node.names:
                aliases[a.asname or a.name] = f"{mod}.{a.name}"
            if mod.split(".")[0] in _PICKLING:
                found.append(f"line {node.lineno}: from {mod} import ...")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute | ast.Name) and not isinstance(
            getattr(node, "ctx", None), ast.Store
        ):
            name = _dotted(node)
            head, _, rest = name.partition(".")
            full = aliases.get(head, head) + (f".{rest}" if rest else "")
            if full.split(".")[0] in _PICKLING and isinstance(node, ast.Attribute):
                found.append(f"line {node.lineno}: {name}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            full = aliases.get(head, head) + (f".{rest}" if rest else "")
            if full == "torch.load" and not _kw_true(node, "weights_only"):
                found.append(f"line {node.lineno}: {name}(...) without weights_only=True")
            if full in ("numpy.load", "np.load") and _kw_true(node, "allow_pickle"):
                found.append(f"line {node.lineno}: {name}(..., allow_pickle=True)")
            if full.endswith("read_pickle") or full.endswith("to_pickle"):
                found.append(f"line {node.lineno}: {name}(...)")
    return sorted(set(found))


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\nx = pickle.loads(b'')",
        "def f(p):\n    import pickle\n    return pickle.loads(p.read_bytes())",
        "from pickle import loads",
        "import pickle as pk\npk.dumps(1)",
        "import torch\ntorch.load('m.bin')",
        "import torch\ntorch.load('m.bin', weights_only=False)",
        "from torch import load\nload('m.bin')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x')",
    ],
)
def test_the_pickle_scan_catches_each_way_in(snippet):
    assert pickle_uses(snippet), snippet


def test_the_pickle_scan_passes_safe_loads_and_mentions():
    ok = (
        "import torch\ntorch.load('m.bin', weights_only=True)\n"
        "msg = 'weights only as pickle, which runs code: refuse (no pickle.loads here)'\n"
        "# pickle.loads would run code\n"
    )
    assert pickle_uses(ok) == []


def test_no_pickle_anywhere_in_src():
    found = {
        str(p.relative_to(ROOT)): uses
        for p in sorted(SRC.rglob("*.py"))
        if (uses := pickle_uses(p.read_text()))
    }
    assert found == {}


# ----------------------------------------------------------------------------------------------
# Result files go through joules.serialize's atomic writers
# ----------------------------------------------------------------------------------------------

# Writes that are not results, each with why it may write in place.
_IN_PLACE_OK = {
    # the sweep's lock file: held open for the sweep's life, its content is never read
    ("src/joules/sweep/runner.py", "open"),
    # the GGUF conversion fills a fresh tempfile.mkdtemp directory, then renames it into place
    ("src/joules/models/loading.py", "write_text"),
    # a throwaway HTML file in a fresh temporary directory, rendered to PNG and discarded
    ("benchmarks/kvcache.py", "write_text"),
    # the bench subprocess's job and answer files, in a private TemporaryDirectory; the answer
    # is read only after the child exits 0
    ("src/joules/sweep/stages.py", "open"),
    ("src/joules/sweep/stages.py", "json.dump"),
    # the fake stages' call log: appended line by line (and fsynced) for the tests to read
    ("src/joules/testing/sweep.py", "open"),
    # a source-built tool's log, streamed while the tool runs (read only for a failure's tail)
    ("benchmarks/peers/llamacpp/check.py", "open"),
}


def in_place_writes(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` for each write that truncates a file in place: ``Path.write_text``/
    ``write_bytes``, ``open``/``Path.open`` for writing or appending, ``json.dump`` to a file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        attr = name.rpartition(".")[2]
        if attr in ("write_text", "write_bytes") or name == "json.dump":
            found.append((node.lineno, attr if attr != "dump" else name))
        elif attr == "open" or name == "open":
            mode_arg = node.args[1] if name == "open" and len(node.args) > 1 else None
            if name != "open" and node.args:
                mode_arg = node.args[0]
            for k in node.keywords:
                if k.arg == "mode":
                    mode_arg = k.value
            mode = mode_arg.value if isinstance(mode_arg, ast.Constant) else "r"
            if isinstance(mode, str) and set(mode) & set("wax"):
                found.append((node.lineno, "open"))
    return found


def test_the_write_scan_catches_in_place_writes():
    src = (
        "from pathlib import Path\nimport json\n"
        "Path('a').write_text('x')\nPath('a').write_bytes(b'x')\n"
        "open('a', 'w')\nPath('a').open('a')\nopen('a', mode='wb')\njson.dump({}, f)\n"
        "open('a')\nPath('a').read_text()\n"
    )
    assert [line for line, _ in in_place_writes(src)] == [3, 4, 5, 6, 7, 8]


def test_result_files_are_written_atomically():
    """Every file that src/ or a bench script writes goes through joules.serialize (a kill
    mid-write leaves the old file); the few in-place writes left are listed with a reason."""
    files = [*SRC.rglob("*.py"), *BENCH.rglob("*.py")]
    found = []
    for p in sorted(files):
        rel = str(p.relative_to(ROOT))
        # downloaded third-party code (a peer's source build, a venv) is not ours to scan
        if rel == "src/joules/serialize.py" or {".venv", "build", "sdist"} & set(p.parts):
            continue
        for line, call in in_place_writes(p.read_text()):
            if (rel, call) not in _IN_PLACE_OK:
                found.append(f"{rel}:{line}: {call}")
    assert found == []
