"""Plain JSON values from joules' typed results, and the one way joules writes a result file.

>>> from joules.serialize import to_jsonable
>>> to_jsonable({"x": float("nan"), "t": (1, 2)})
{'x': None, 't': [1, 2]}

Every result, cache or model directory joules writes goes through the atomic writers below
(``atomic_write_json(path, obj)``, ``with atomic_directory(path) as tmp: ...``), so a run killed
mid-write leaves the previous file or nothing, never a truncated file that is read back later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import glob
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def to_jsonable(obj: Any, *, finite: bool = True) -> Any:
    """Turn dataclasses, enums, paths, tuples and tensors into plain JSON values.

    With ``finite`` (the default, for strict JSON readers) NaN and inf become None; a cache that
    joules alone reads back keeps them (``finite=False``: Python's json writes ``NaN``).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict(), finite=finite)
        return {
            f.name: to_jsonable(getattr(obj, f.name), finite=finite)
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, finite=finite) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v, finite=finite) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if finite and isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist(), finite=finite)
    return obj


# ----------------------------------------------------------------------------------------------
# Atomic writes: a kill at any instant leaves the old file (or directory) or the new one, never
# half of one that a later run would read back as a result.
# ----------------------------------------------------------------------------------------------

# Temporaries sit beside their target (``os.replace`` is atomic only within one filesystem) and
# name their writer's pid, so a later writer can remove what a killed one left behind.
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; returns them.

    A directory a killed replace had moved aside (``.NAME.old-PID-*``) is moved back when
    ``path`` itself is missing: the kill fell between the two renames, and the old content is
    the last complete one. Temporaries of processes still running on this machine are left
    alone.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tag in (_OLD_TAG, _TMP_TAG):
        for p in sorted(path.parent.glob(f".{glob.escape(path.name)}{tag}*")):
            pid_text = p.name[len(path.name) + 1 + len(tag) :].split("-", 1)[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            if tag == _OLD_TAG and not path.exists():
                os.rename(p, path)
                continue
            _remove(p)
            removed.append(p)
    return removed


def _fsync_file(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends, move it onto ``path``.

    For writers that take a file name (safetensors, GGUF, CSV): they write the temporary, which
    is flushed to disk and renamed over ``path`` only when the block finishes without an
    exception (an exception removes it). A kill leaves ``path`` as it was. ``path``'s
    directory must exist, as for ``open(path, "w")``.
    """
    path = Path(path)
    clean_stale_temporaries(path)
    tmp = _sibling(path, _TMP_TAG)
    try:
        yield tmp
        _fsync_file(tmp)  # the writer may have closed it without fsync
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_file(path.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, through :func:`atomic_path` (``"w"`` or ``"wb"``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        kwargs: dict[str, Any] = (
            {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": newline}
        )
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:  # x: the name must be new
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a kill leaves the old file or the new one."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that a kill leaves the old file or the new one."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """``json.dumps(obj, indent=indent, **kwargs)`` written through :func:`atomic_write_text`.

    The text is made before the file is touched, so an object that cannot be serialized leaves
    the old file too.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; once the block ends, it becomes ``path``.

    Everything written into the staging directory is flushed to disk, then the directory is
    renamed into place; an existing ``path`` is first renamed aside and removed afterwards. A
    kill leaves the old directory or the new one (or, between the two renames, none at
    ``path`` and the old one aside, which :func:`clean_stale_temporaries` moves back). An
    exception in the block removes the staging directory and leaves ``path`` untouched.
    Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    staging, aside = _sibling(path, _TMP_TAG), _sibling(path, _OLD_TAG)
    staging.mkdir()
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_file(Path(root))
        if path.exists() or path.is_symlink():
            os.rename(path, aside)
        os.rename(staging, path)
    except BaseException:
        if aside.exists() and not path.exists():  # failed between the renames: put it back
            os.rename(aside, path)
        _remove(staging)
        raise
    _fsync_file(path.parent)
    _remove(aside)
