"""The one name <-> torch dtype map answers both spellings and refuses unknown names."""

from __future__ import annotations

import pytest
import torch

from joules import dtypes
from joules.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "dt"),
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("torch.float32", torch.float32),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("half", torch.float16),
        ("double", torch.float64),
        ("uint8", torch.uint8),
        ("bool", torch.bool),
    ],
)
def test_names_map_to_dtypes(name: str, dt: torch.dtype) -> None:
    assert dtypes.to_torch(name) is dt


def test_names_of_dtypes_round_trip() -> None:
    for name, dt in dtypes.SHORT.items():
        assert dtypes.short_name(dt) == name and dtypes.to_torch(name) is dt
    for name, dt in dtypes.TORCH.items():
        assert dtypes.torch_name(dt) == name and dtypes.to_torch(name) is dt
    assert dtypes.short_name(torch.int8) == "int8"


def test_unknown_and_non_float_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown dtype 'fp7': valid dtypes are fp64"):
        dtypes.to_torch("fp7")
    with pytest.raises(ConfigError, match=r"valid dtypes are fp64, fp32, bf16, fp16$"):
        dtypes.float_dtype("int8")
    assert not dtypes.is_known("fp7") and dtypes.is_known("fp16")
    assert dtypes.choices("fp32", "bf16") == {"fp32": torch.float32, "bf16": torch.bfloat16}
