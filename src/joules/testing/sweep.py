"""Fake stages over a tiny random model, so every path of the sweep runs in CI in seconds.

    >>> from joules.testing.sweep import FakeStages, fake_recipe
    >>> fake_recipe("round(bits=4)")
    'round(bits=4)'
    >>> stages = FakeStages().stages()
    >>> stages.missing
    {}

Loading is :func:`joules.models.tiny_model` and evaluation is the real
:func:`joules.evaluate.perplexity` on that tiny model (so pairing with the baseline is real).
Compression ``round(bits=N)`` rounds every decoder linear weight to N-bit symmetric per-row
integers (emulated); bench and predict return figures computed from the model's bytes, shaped
like ``BenchResult.to_dict()`` and ``Prediction.to_dict()``. Every call appends a line to
``log_path`` (if set) so tests can count what was computed, and ``sleep_s`` slows each bench so
a test can kill a sweep in the middle.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from joules.compress.manifest import Manifest
from joules.errors import ConfigError
from joules.sweep.spec import BenchSpec, CalibrationSpec, EvalSpec
from joules.sweep.stages import Progress, Stages, baseline_manifest
from joules.sweep.stages import evaluate as real_evaluate

_RECIPE = re.compile(r"^round\(bits=(\d+)\)$")
FAKE_BANDWIDTH_B_PER_S = {"this-machine": 20e9, "h100": 3.35e12, "a100": 2.0e12}


def fake_recipe(text: str) -> str:
    """Validate a fake recipe ``round(bits=N)`` (2 ≤ N ≤ 16) and return its canonical string."""
    m = _RECIPE.match(text.replace(" ", ""))
    if not m or not 2 <= int(m.group(1)) <= 16:
        raise ConfigError(f"fake recipe must be round(bits=N) with 2 <= N <= 16, got {text!r}")
    return f"round(bits={int(m.group(1))})"


@dataclass
class FakeStages:
    log_path: str | None = None
    sleep_s: float = 0.0
    fail_recipes: tuple[str, ...] = ()
    seed: int = 0
    calls: list[str] = field(default_factory=list)

    def _log(self, line: str) -> None:
        self.calls.append(line)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{os.getpid()} {line}\n")
                f.flush()
                os.fsync(f.fileno())

    def load(self, spec: str, dtype: str) -> tuple[Any, Any, Any]:
        import torch

        from joules.models import tiny_model

        self._log(f"load {spec}")
        return tuple(tiny_model("llama", seed=self.seed, dtype=getattr(torch, dtype)))  # type: ignore[return-value]

    def calibration(self, tokenizer: Any, c: CalibrationSpec) -> tuple[Any, dict[str, Any]]:
        import torch

        self._log("calibration")
        g = torch.Generator().manual_seed(c.seed)
        tokens = torch.randint(3, 259, (c.n, c.length), generator=g)
        return tokens, {
            "seed": c.seed,
            "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        }

    def compress(
        self,
        model: Any,
        recipe: str,
        calib: Any,
        tokenizer: Any,
        info: Any,
        progress: Progress | None,
    ) -> tuple[Any, dict[str, Any]]:
        import torch

        self._log(f"compress {recipe}")
        if recipe in self.fail_recipes:
            raise RuntimeError(f"fake failure compressing {recipe}")
        bits = int(_RECIPE.match(recipe).group(1))  # type: ignore[union-attr]
        source = model
        model = copy.deepcopy(model)
        model.joules_reference = weakref.ref(source)  # what a deviation task compares it with
        record = Manifest()
        layers = {}
        qmax = 2 ** (bits - 1) - 1
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        names = [n for n in names if n.startswith("model.layers.")]
        for i, name in enumerate(names):
            lin = model.get_submodule(name)
            with torch.no_grad():
                w = lin.weight
                before = w.clone()
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
                w.copy_((w / scale).round().clamp(-qmax, qmax) * scale)
            record.record_weight_error(name, before, w)  # as every real step does
            layers[name] = {
                "format": f"int{bits}-ch",
                "bits_per_weight": bits + 16 / w.shape[1],
                **record.layers[name],
            }
            if progress:
                progress(i + 1, len(names))
        base = baseline_manifest(model, None)
        linear_params = sum(model.get_submodule(n).weight.numel() for n in names)
        model.fake_recipe = recipe
        model.fake_layers = tuple(layers)
        model.fake_bytes = base["model_bytes"] - linear_params * (32 - bits) // 8
        return model, {
            "recipe": recipe,
            "bits_per_weight": bits + 16 / model.get_submodule(names[0]).weight.shape[1],
            "model_bytes": model.fake_bytes,
            "layers": layers,
            "calibration": calib[1],
        }

    def evaluate(
        self,
        task: str,
        model: Any,
        tokenizer: Any,
        info: Any,
        ev: EvalSpec,
        progress: Progress | None,
    ) -> dict[str, Any]:
        self._log(f"evaluate {getattr(model, 'fake_recipe', 'baseline')} {task}")
        return real_evaluate(task, model, tokenizer, info, ev, progress)

    def bench(
        self, model: Any, tokenizer: Any, info: Any, b: BenchSpec, progress: Progress | None
    ) -> dict[str, Any]:
        self._log(f"bench {getattr(model, 'fake_recipe', 'baseline')} p{b.prompt_len}")
        steps = max(1, int(self.sleep_s / 0.05))
        for i in range(steps):
            if self.sleep_s:
                time.sleep(self.sleep_s / steps)
            if progress:
                progress(i + 1, steps)
        nbytes = getattr(model, "fake_bytes", None) or _model_bytes(model)
        tpot = nbytes / FAKE_BANDWIDTH_B_PER_S["this-machine"]
        ttft = tpot * b.prompt_len / 8

        def interval(v: float) -> dict[str, Any]:
            vals = [0.98 * v, v, 1.02 * v]
            return {"median": v, "ci95_low": 0.95 * v, "ci95_high": 1.05 * v, "values": vals}

        def energy(seconds: float, tokens: int) -> dict[str, Any]:
            e = 40.0 * seconds  # a 40 W machine
            return {
                "energy_j": [0.97 * e, e, 1.03 * e],
                "tokens": tokens,
                "method": "estimated",
                "uncertainty_j": 0.1 * e,
                "j_per_token": e / tokens,
                "timeline": {"t_s": [0.0, seconds], "power_w": [40.0, 40.0]},
            }

        decoded = b.batch * (b.gen_len - 1)
        return {
            "model": "fake",
            "runtime": b.runtime,
            "rows": [
                {
                    "prompt_len": b.prompt_len,
                    "batch": b.batch,
                    "gen_len": b.gen_len,
                    "ttft_s": interval(ttft),
                    "tpot_s": interval(tpot),
                    "decode_tok_s": b.batch / tpot,
                    "peak_rss_bytes": nbytes + 50_000_000,
                    "model_bytes": nbytes,
                    "prefill_energy": energy(ttft, b.batch * b.prompt_len),
                    "decode_energy": energy(tpot * max(decoded, 1), max(decoded, 1)),
                }
            ],
            "linear_paths": dict(Counter(self.layer_paths(model).values())),
        }

    def predict(
        self, model: Any, info: Any, manifest: dict[str, Any], hardware: str, b: BenchSpec | None
    ) -> dict[str, Any]:
        self._log(f"predict {manifest['recipe']} {hardware}")
        tpot = manifest["model_bytes"] / FAKE_BANDWIDTH_B_PER_S.get(hardware, 1e11)
        return {
            "method": "predicted",
            "hardware": hardware,
            "prefill_s": tpot * 4,
            "tpot_s": tpot,
            "decode_tok_s": 1 / tpot,
            "decode_j_per_token": 700.0 * tpot,
            "peak_memory_bytes": manifest["model_bytes"] * 1.2,
            "band": {"prefill": 0.2, "decode": 0.15},
            "energy_band": {},
        }

    def layer_paths(self, model: Any) -> dict[str, str]:
        return {n: "emulated" for n in getattr(model, "fake_layers", ())}

    def stages(self) -> Stages:
        return Stages(
            load=self.load,
            calibration=self.calibration,
            compress=self.compress,
            evaluate=self.evaluate,
            bench=self.bench,
            predict=self.predict,
            baseline_manifest=baseline_manifest,
            layer_paths=self.layer_paths,
        )


def _model_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
