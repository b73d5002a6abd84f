"""An extension is one file: a task, a compression step and a runtime defined in this module
(and nowhere else) are listed by the CLI, run by it, and accepted by a sweep spec.

Each registry is the only list: nothing else in joules is edited for them. The ``throwaway``
fixture registers them with the decorators a real extension uses and unregisters them after
each test, so no other test sees them; ``test_unregistered_they_are_refused_everywhere`` shows
that the same checks fail without the registration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import pytest
import torch
from typer.testing import CliRunner

from joules.bench.probe import MachineLimits, save_machine_limits
from joules.bench.runtimes import RUNTIMES, EagerRuntime, register_runtime
from joules.cli import app
from joules.compress.recipe import STEPS, Step, register_step
from joules.errors import ConfigError
from joules.evaluate.tasks import TASKS, Task, register
from joules.sweep.spec import parse_spec
from joules.system import cpu_model

TASK = "joules-throwaway-task"
STEP = "joules_throwaway_step"
RUNTIME = "joules-throwaway-runtime"

runner = CliRunner()


@dataclass
class CountResult:
    """What the throwaway task returns: a typed result with ``to_dict``."""

    tokens: int
    mean_logit: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CountTokens(Task):
    """Counts tokens."""

    progress_unit: ClassVar[str] = "throwaway texts"
    text: str = "The quick brown fox"

    def run(self, model: Any, tokenizer: Any, info: Any, progress: Any = None) -> CountResult:
        ids = tokenizer(self.text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        if progress is not None:
            progress(1, 1)
        return CountResult(tokens=int(ids.shape[1]), mean_logit=float(logits.mean()))


@dataclass(kw_only=True)
class ScaleWeights(Step):
    """Multiplies every targeted linear weight by ``factor``."""

    factor: float = 1.0

    def validate(self) -> None:
        if not self.factor > 0:
            raise ConfigError(f"{STEP}: factor must be > 0, got {self.factor}")

    def apply(self, ctx: Any) -> None:
        with torch.no_grad():
            for module in ctx.resolve_targets(self.targets).values():
                module.weight.mul_(self.factor)


class CountingRuntime(EagerRuntime):
    """Eager, counted.

    The eager runtime, counting its prefills (so a test sees that it ran)."""

    prefills: ClassVar[int] = 0

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        type(self).prefills += 1
        return super().prefill(ids)


@pytest.fixture
def throwaway() -> Iterator[None]:
    """Register the three extensions as their own module would, and remove them afterwards."""
    register(TASK)(CountTokens)
    register_step(STEP)(ScaleWeights)
    register_runtime(RUNTIME)(CountingRuntime)
    try:
        yield
    finally:
        TASKS.unregister(TASK)
        STEPS.unregister(STEP)
        RUNTIMES.unregister(RUNTIME)


@pytest.fixture
def limits_cached(tmp_path, monkeypatch):
    """Machine limits in a private cache, so the bench does not probe this machine."""
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path / "cache"))
    save_machine_limits(
        MachineLimits(cpu_model(), torch.get_num_threads(), 5e9, 6e9, {"fp32": 2e10, "bf16": 2e9})
    )


def _spec(task: str = TASK, recipe: str = f"{STEP}(factor=0.5)", runtime: str = RUNTIME) -> str:
    return f"""
models = ["tiny"]
recipes = ["baseline", "{recipe}"]
[eval]
tasks = ["wikitext2", "{task}"]
[bench]
prompt_len = 8
gen_len = 3
runtime = "{runtime}"
"""


def _invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_the_cli_lists_each_and_its_help_says_where(throwaway):
    tasks = _invoke("eval", "--list-tasks")
    assert tasks.exit_code == 0, tasks.output
    assert TASK in tasks.stdout and "throwaway texts" in tasks.stdout
    assert "Counts tokens." in tasks.stdout  # the first line of the class's docstring
    steps = _invoke("compress", "--list-steps")
    assert steps.exit_code == 0, steps.output
    assert STEP in steps.stdout and "factor" in steps.stdout
    runtimes = _invoke("bench", "--list-runtimes")
    assert runtimes.exit_code == 0, runtimes.output
    assert RUNTIME in runtimes.stdout and "Eager, counted." in runtimes.stdout
    for command, flag in (("eval", "--list-tasks"), ("compress", "--list-steps"),
                          ("bench", "--list-runtimes")):  # fmt: skip
        help_text = _invoke(command, "--help")
        assert help_text.exit_code == 0 and flag in help_text.stdout


def test_joules_eval_runs_the_task_with_its_progress_unit_and_renderer(throwaway, tiny_dir):
    out = _invoke("eval", str(tiny_dir), "--task", TASK, "--json")
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["tokens"] > 0 and isinstance(d["mean_logit"], float)
    shown = _invoke("eval", str(tiny_dir), "--task", TASK)
    assert shown.exit_code == 0, shown.output
    assert "tokens" in shown.stdout and str(d["tokens"]) in shown.stdout


def test_joules_compress_applies_the_step(throwaway, tiny_dir, tmp_path):
    out = _invoke("compress", str(tiny_dir), "-r", f"{STEP}(factor=0.5)", "-o",
                  str(tmp_path / "out"), "--json")  # fmt: skip
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert [s["name"] for s in d["manifest"]["steps"]] == [STEP]
    bad = _invoke("compress", str(tiny_dir), "-r", f"{STEP}(factor=-1)", "-o", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "factor must be > 0" in bad.output


def test_joules_bench_runs_the_runtime(throwaway, tiny_dir, limits_cached):
    before = CountingRuntime.prefills
    args = ["--prompt-len", "8", "--gen-len", "3", "--repeats", "1", "--warmup", "0"]
    out = _invoke("bench", str(tiny_dir), "--runtime", RUNTIME, *args, "--no-energy", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["runtime"] == RUNTIME
    assert CountingRuntime.prefills > before


def test_a_sweep_spec_accepts_each(throwaway):
    spec = parse_spec(_spec(), check_models=False)  # the recipe goes through parse_recipe
    assert spec.eval.tasks == ("wikitext2", TASK)
    assert spec.recipes == ("baseline", f"{STEP}(factor=0.5)")
    assert [b.runtime for b in spec.bench] == [RUNTIME]


def test_unregistered_they_are_refused_everywhere(tiny_dir):
    rtn = "rtn(format=int8-ch)"
    for text, match in (
        (_spec(recipe=rtn, runtime="eager"), f"unknown task '{TASK}'"),
        (_spec(task="hellaswag", runtime="eager"), f"unknown compression step '{STEP}'"),
        (_spec(task="hellaswag", recipe=rtn), f"unknown runtime '{RUNTIME}'"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_spec(text, check_models=False)
    assert TASK not in _invoke("eval", "--list-tasks").stdout
    assert STEP not in _invoke("compress", "--list-steps").stdout
    assert RUNTIME not in _invoke("bench", "--list-runtimes").stdout
    out = _invoke("eval", str(tiny_dir), "--task", TASK)
    assert out.exit_code == 2 and f"unknown task '{TASK}'" in out.output


def test_a_runtime_that_runs_its_own_file_benches_the_file_each_run_exports():
    # llamacpp benches a .gguf it loads itself: the sweep exports each run's file, so a recipe
    # without a GGUF form is refused when the spec is read
    text = _spec(task="hellaswag", recipe="rtn(format=int8-ch)", runtime="llamacpp")
    with pytest.raises(ConfigError, match="'rtn\\(format=int8-ch\\)' has no deployable file"):
        parse_spec(text, check_models=False)
    ok = parse_spec(_spec(task="hellaswag", recipe="rtn(format=gguf-q8_0)", runtime="llamacpp"),
                    check_models=False)  # fmt: skip
    assert ok.deploy is not None and ok.runs()[0].needs_file
