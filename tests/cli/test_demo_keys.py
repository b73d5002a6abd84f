"""`joules demo`'s quick-look key: new code or new weights measure again, a comment does not."""

from __future__ import annotations

import os
import shutil

from joules import fingerprint
from joules.cli.demo import _look_key


def test_the_quick_look_key_follows_code_versions_and_model_content(
    tiny_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    key = _look_key(str(model), 4)
    assert _look_key(str(model), 4) == key and _look_key(str(model), 5) != key
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "f" * 64)  # an edited joules
    assert _look_key(str(model), 4) != key
    monkeypatch.undo()
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    assert _look_key(str(model), 4) == key
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock
    assert _look_key(str(model), 4) != key
