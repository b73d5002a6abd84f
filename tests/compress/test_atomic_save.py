"""save_compressed: a directory is complete only when its manifest is, and a kill loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from joules.compress import compress, load_compressed, save_compressed
from joules.compress.manifest import MANIFEST_FILE
from joules.errors import ConfigError, UnsupportedModelError
from joules.models import tiny_model

# A child that saves a second recipe over DIR and is SIGKILLed inside the save: a save hook
# (they run after the weights and tokenizer are in the staging directory, before the manifest)
# writes MARKER and blocks until the kill.
_KILLED_SAVE = """
import sys, time
from pathlib import Path
from joules.compress import compress
from joules.compress.api import register_save_hook
from joules.models import tiny_model

directory, marker = Path(sys.argv[1]), Path(sys.argv[2])

@register_save_hook
def _block(model, staging):
    marker.write_text(str(staging))
    time.sleep(600)  # SIGKILLed here

model, tok, _ = tiny_model("llama", seed=0)
compress(model, "rtn(format=int4-g32)").save(directory, tok)
"""


def _save(recipe: str, directory: Path) -> None:
    model, tok, _ = tiny_model("llama", seed=0)
    compress(model, recipe).save(directory, tok)


def test_a_save_killed_mid_way_leaves_the_old_directory_and_a_rerun_completes(tmp_path):
    d, marker = tmp_path / "c", tmp_path / "marker"
    _save("rtn(format=int8-ch)", d)
    old_weights = (d / "model.safetensors").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(d), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the save exited before its kill point: {proc.communicate()}")
        assert time.monotonic() < deadline, "the save never reached its kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    staging = Path(marker.read_text())
    assert staging.parent == tmp_path and (staging / "model.safetensors").is_file()
    # the old directory is whole and still loads as the old recipe
    assert (d / "model.safetensors").read_bytes() == old_weights
    _, _, manifest = load_compressed(d)
    assert manifest.recipe == "rtn(format=int8-ch)"
    # the half-written one has weights but no manifest: nothing accepts it
    with pytest.raises(UnsupportedModelError, match=r"no joules\.json"):
        load_compressed(staging)

    _save("rtn(format=int4-g32)", d)  # the work resumes
    _, _, manifest = load_compressed(d)
    assert manifest.recipe == "rtn(format=int4-g32)"
    assert not staging.exists()  # the killed save's staging directory is swept up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "marker"]


def test_the_manifest_is_written_last_and_records_every_file(tmp_path):
    _save("rtn(format=int4-g32)", tmp_path / "c")
    raw = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    on_disk = {
        p.relative_to(tmp_path / "c").as_posix(): p.stat().st_size
        for p in (tmp_path / "c").rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    assert raw["files"] == on_disk and "model.safetensors" in on_disk


def test_a_directory_that_differs_from_its_manifest_is_refused(tmp_path):
    d = tmp_path / "c"
    _save("rtn(format=int4-g32)", d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # e.g. an interrupted copy
    with pytest.raises(UnsupportedModelError, match=r"incomplete: model\.safetensors"):
        load_compressed(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="incomplete"):
        load_compressed(d)


def test_saving_over_a_directory_of_other_files_is_refused(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("not joules'")
    model, tok, _ = tiny_model("llama", seed=0)
    cm = compress(model, "rtn(format=int8-ch)")
    with pytest.raises(ConfigError, match="not a joules compressed directory"):
        save_compressed(cm.model, cm.manifest, d, tok)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_compressed(cm.model, cm.manifest, empty, tok)  # an empty directory is fine
    assert load_compressed(empty)[2].recipe == "rtn(format=int8-ch)"
