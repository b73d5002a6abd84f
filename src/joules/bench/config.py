"""`BenchConfig`: the workload of one ``joules bench`` run, validated before any work starts.

    >>> from joules.bench import BenchConfig
    >>> cfg = BenchConfig(prompt_lens=(128, 512), gen_len=64, batch_sizes=(1, 4), repeats=5)
    >>> cfg.validate()
    >>> BenchConfig.from_dict(cfg.to_dict()) == cfg
    True

Every bad value is a :class:`joules.errors.ConfigError` with one line naming the field and the
fix; limits that depend on the model (context length, memory) are checked by
:func:`joules.bench.runner.check_workload`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from joules.bench.runtimes import RUNTIMES
from joules.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class BenchConfig:
    """What to run: prompt lengths × batch sizes, each ``warmup`` + ``repeats`` times.

    ``gen_len`` counts every generated token, the first included (it comes out of prefill), so a
    run has ``gen_len - 1`` decode steps. ``threads`` None keeps torch's current thread count.
    ``dtype`` "auto" keeps the model's dtype; "fp32"/"bf16" cast the model in place.
    ``energy`` False runs without a meter (for the meter-overhead comparison).
    """

    prompt_lens: tuple[int, ...] = (128,)
    gen_len: int = 64
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    runtime: str = "eager"
    threads: int | None = None
    seed: int = 0
    dtype: str = "auto"
    energy: bool = True

    def validate(self) -> None:
        """Raise ConfigError on the first invalid field."""
        if not self.prompt_lens or any(int(p) < 1 for p in self.prompt_lens):
            raise ConfigError(
                f"prompt lengths must be positive integers, got {list(self.prompt_lens)}"
            )
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(
                f"batch sizes must be positive integers, got {list(self.batch_sizes)}"
            )
        if self.gen_len < 2:
            raise ConfigError(
                f"gen_len must be >= 2 (one token from prefill, at least one decode step), "
                f"got {self.gen_len}"
            )
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.runtime not in RUNTIMES:
            raise RUNTIMES.unknown(self.runtime)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_lens"] = list(self.prompt_lens)
        d["batch_sizes"] = list(self.batch_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        d = dict(d)
        d["prompt_lens"] = tuple(d.get("prompt_lens", (128,)))
        d["batch_sizes"] = tuple(d.get("batch_sizes", (1,)))
        return cls(**d)
