"""joules.serialize: plain JSON values, and writes that a kill cannot leave half done."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from joules.serialize import (
    atomic_directory,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temporaries,
    to_jsonable,
)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Block until the child has written ``marker`` (it then sleeps, waiting for its kill)."""
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the writer exited early ({proc.returncode}): {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached its kill point")
        time.sleep(0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_to_jsonable_keeps_non_finite_floats_only_when_asked():
    assert to_jsonable({"x": math.nan, "t": (1, math.inf)}) == {"x": None, "t": [1, None]}
    kept = to_jsonable({"x": math.nan, "t": (1, math.inf)}, finite=False)
    assert math.isnan(kept["x"]) and kept["t"] == [1, math.inf]


def test_atomic_writes_replace_the_file_and_leave_no_temporaries(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2, "nan": math.nan})
    assert json.loads(p.read_text())["a"] == 2
    atomic_write_text(tmp_path / "t.txt", "héllo [bench]\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo [bench]\n"
    with atomic_open(tmp_path / "c.csv", "w", newline="") as f:
        f.write("a,b\r\n")
    assert (tmp_path / "c.csv").read_bytes() == b"a,b\r\n"
    assert _siblings(p) == ["c.csv", "t.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})  # not serializable: fails before the file
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write('{"a": ')
        raise RuntimeError("killed by an exception half way")
    assert json.loads(p.read_text()) == {"a": 1}
    assert _siblings(p) == []
    with pytest.raises(FileNotFoundError):  # as open(path, "w"): the directory must exist
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")


def test_the_written_file_has_the_umask_mode_not_a_private_temporary_one(tmp_path):
    p = atomic_write_bytes(tmp_path / "b.bin", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


_FILE_WRITER = """
import sys, time
from pathlib import Path
from joules.serialize import atomic_open
path, marker, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with atomic_open(path, "wb") as f:
    f.write(b"n" * (size // 2))
    f.flush()
    marker.write_text("half written")
    time.sleep(600)  # SIGKILLed here
    f.write(b"n" * (size - size // 2))
"""


def test_a_writer_killed_mid_file_leaves_the_old_file_and_a_rerun_completes(tmp_path):
    path, marker = tmp_path / "results.json", tmp_path / "marker"
    old = b'{"rows": ["old"]}'
    path.write_bytes(old)
    size = 8 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", _FILE_WRITER, str(path), str(marker), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == old  # the kill left the old result, untouched
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".results.json.tmp-")]
    assert len(left) == 1 and left[0].stat().st_size == size // 2  # the half file, aside
    # the work resumes: a new write completes and sweeps up the killed writer's temporary
    atomic_write_bytes(path, b"n" * size)
    assert path.stat().st_size == size
    assert _siblings(path) == ["marker"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    d = tmp_path / "model"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("old")
    assert (d / "sub" / "b.txt").read_text() == "old"
    with pytest.raises(RuntimeError), atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("failed half way")
    assert (d / "a.txt").read_text() == "old" and (d / "sub").is_dir()
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (d / "a.txt").read_text() == "new" and not (d / "sub").exists()
    assert _siblings(d) == []


def test_a_kill_between_the_two_renames_gets_the_old_directory_back(tmp_path):
    d = tmp_path / "model"
    aside = tmp_path / f".model.old-{_dead_pid()}-0000"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    staging = tmp_path / f".model.tmp-{_dead_pid()}-0000"
    staging.mkdir()
    removed = clean_stale_temporaries(d)
    assert (d / "a.txt").read_text() == "old"
    assert removed == [staging] and _siblings(d) == []


def test_temporaries_of_a_live_writer_are_left_alone(tmp_path):
    live = tmp_path / f".r.json.tmp-{os.getppid()}-0000"
    live.write_text("another process is writing this")
    atomic_write_json(tmp_path / "r.json", {})
    assert live.exists()
