"""BenchConfig: round trip and one-line errors for every bad field."""

from __future__ import annotations

import pytest

from joules.bench import BenchConfig
from joules.errors import ConfigError


def test_round_trip():
    cfg = BenchConfig(prompt_lens=(128, 512), batch_sizes=(1, 4), runtime="compiled", threads=2)
    cfg.validate()
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_lens": (0,)}, "prompt lengths"),
        ({"prompt_lens": ()}, "prompt lengths"),
        ({"batch_sizes": (-1,)}, "batch sizes"),
        ({"gen_len": 1}, "gen_len"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"threads": 0}, "threads"),
        ({"dtype": "fp8"}, "dtype"),
        ({"runtime": "vllm"}, "runtime"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        BenchConfig(**kwargs).validate()
    assert "\n" not in str(e.value)
