"""`joules demo`'s quick-look cache: plain JSON through the result types, never pickle."""

from __future__ import annotations

import json

import pytest

from joules.cli.demo import DemoResult, _quick_look, _store_quick_look, _stored_quick_look
from joules.formats.error import FormatError
from joules.measure.base import Measurement
from joules.models.generate import GenerationResult
from joules.models.info import ModelInfo
from joules.predict.result import Prediction
from joules.serialize import to_jsonable


def _same(a, b) -> bool:
    """Equal as JSON text, NaN and inf included (NaN != NaN would fail a plain ==)."""
    return json.dumps(to_jsonable(a, finite=False), sort_keys=True) == json.dumps(
        to_jsonable(b, finite=False), sort_keys=True
    )


@pytest.fixture(scope="module")
def look(tiny_dir):
    return _quick_look(str(tiny_dir), 4)


def test_each_result_type_round_trips_through_its_dict(look):
    for obj, cls in [
        (look.info, ModelInfo),
        (look.generation, GenerationResult),
        (look.generation_energy, Measurement),
        *((f, FormatError) for f in look.formats),
        *((p, Prediction) for p in look.predictions or []),
    ]:
        back = cls.from_dict(json.loads(json.dumps(to_jsonable(obj, finite=False))))
        assert type(back) is cls and _same(back, obj), cls.__name__


def test_the_quick_look_is_stored_as_json_and_read_back_whole(look, tiny_dir, tmp_path):
    path = tmp_path / "quick_look.json"
    _store_quick_look(path, str(tiny_dir), 4, look)
    data = json.loads(path.read_text())  # plain JSON: reading it cannot run code
    assert set(data) == {"key", "result"} and data["result"]["measured_at"] == look.measured_at
    back = _stored_quick_look(path, str(tiny_dir), 4)
    assert isinstance(back, DemoResult) and _same(back, look)
    assert isinstance(back.info, ModelInfo) and isinstance(back.generation_energy, Measurement)
    assert back.energy_j_per_token == look.energy_j_per_token
    assert [type(p) for p in back.predictions or []] == [Prediction] * len(look.predictions or [])


def test_other_settings_or_an_unreadable_file_measure_again(look, tiny_dir, tmp_path):
    path = tmp_path / "quick_look.json"
    _store_quick_look(path, str(tiny_dir), 4, look)
    assert _stored_quick_look(path, str(tiny_dir), 5) is None  # another --new-tokens
    data = json.loads(path.read_text())
    del data["result"]["generation"]
    path.write_text(json.dumps(data))
    assert _stored_quick_look(path, str(tiny_dir), 4) is None
    path.write_text("{not json")
    assert _stored_quick_look(path, str(tiny_dir), 4) is None
    assert _stored_quick_look(tmp_path / "none.json", str(tiny_dir), 4) is None
