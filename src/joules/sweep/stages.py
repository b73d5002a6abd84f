"""The stage table: what a run calls to load, compress, evaluate, bench and predict.

    >>> from joules.sweep.stages import default_stages
    >>> stages = default_stages()
    >>> sorted(stages.missing)   # doctest: +SKIP
    ['bench', 'predict']

The runner only sees a :class:`Stages` value, so tests pass tiny fakes (``joules.sweep.fake``)
and a stage whose module is not installed is recorded in ``missing``: a run that needs it fails
with that reason (stored, re-tried with ``--retry-failed`` once the stage exists), it is never
skipped silently nor reported as done.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joules.sweep.spec import BASELINE, BenchSpec, CalibrationSpec, EvalSpec

Progress = Callable[[int, int], None]  # (done, total) of the current phase


@dataclass
class Stages:
    """Callables a run is made of (each may be None when its module is not installed).

    load(model_spec, dtype) -> (model, tokenizer, info)
    calibration(tokenizer, CalibrationSpec) -> (LongTensor [n, length], {sha256, ...})
    compress(model, recipe, (tokens, calib info), tokenizer, info, progress) -> (model', manifest)
    layer_paths(model) -> {layer name: "emulated" | "kernel:<name>/<dtype>"} after a forward
    evaluate(task, model, tokenizer, info, EvalSpec, progress) -> {result, window_nll, window_tokens}
    bench(model, tokenizer, info, BenchSpec, progress) -> BenchResult dict
    predict(model, info, manifest, hardware, BenchSpec | None) -> Prediction dict
    baseline_manifest(model, info) -> manifest-like dict of the model as loaded
    """

    load: Callable[[str, str], tuple[Any, Any, Any]]
    calibration: Callable[[Any, CalibrationSpec], tuple[Any, dict[str, Any]]] | None
    compress: Callable[..., tuple[Any, dict[str, Any]]] | None
    evaluate: Callable[[str, Any, Any, Any, EvalSpec, Progress | None], dict[str, Any]] | None
    bench: Callable[[Any, Any, Any, BenchSpec, Progress | None], dict[str, Any]] | None
    predict: Callable[[Any, Any, dict[str, Any], str, BenchSpec | None], dict[str, Any]] | None
    baseline_manifest: Callable[[Any, Any], dict[str, Any]]
    layer_paths: Callable[[Any], dict[str, str]] | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def need(self, name: str) -> Callable[..., Any]:
        """The stage ``name``, or a one-line error saying why it is not available."""
        from joules.errors import ConfigError

        fn = getattr(self, name)
        if fn is None:
            raise ConfigError(
                f"stage {name!r} is not available: {self.missing.get(name, 'not configured')}"
            )
        return fn


# ---- default implementations over the joules library ------------------------------------


def load(spec: str, dtype: str) -> tuple[Any, Any, Any]:
    import torch

    from joules.models import load_model

    return tuple(load_model(spec, dtype=getattr(torch, dtype)))  # type: ignore[return-value]


def calibration(tokenizer: Any, c: CalibrationSpec) -> tuple[Any, dict[str, Any]]:
    from joules.compress import calibration_tokens

    return calibration_tokens(tokenizer, n=c.n, length=c.length, seed=c.seed)


def compress(
    model: Any, recipe: str, calib: tuple[Any, dict[str, Any]], tokenizer: Any, info: Any,
    progress: Progress | None,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    from joules.compress import compress as run_compress

    tokens, calib_info = calib
    # Compress a copy: compress() works in place, and the loaded model is shared by every run
    # of this model (and its baseline).
    cm = run_compress(
        copy.deepcopy(model),
        recipe,
        calibration=tokens,
        tokenizer=tokenizer,
        calibration_info=calib_info,
        source=getattr(info, "spec", "") or "",
        prequantized=getattr(info, "prequantized", None),
        progress=(lambda what, done, total: progress(done, total)) if progress else None,
    )
    return cm.model, cm.manifest.to_dict()


def layer_paths(model: Any) -> dict[str, str]:
    """The kernel path each compressed linear ran in its last forward, by name."""
    from joules.compress import layer_paths as paths

    return paths(model)


def evaluate(
    task: str, model: Any, tokenizer: Any, info: Any, ev: EvalSpec, progress: Progress | None
) -> dict[str, Any]:
    from joules.evaluate.perplexity import wikitext2_perplexity

    if task != "wikitext2":  # the spec validates tasks; this guards direct API use
        from joules.errors import ConfigError

        raise ConfigError(f"the sweep cannot evaluate task {task!r}: use wikitext2")
    r = wikitext2_perplexity(
        model,
        tokenizer,
        split=ev.split,
        window=ev.window,
        stride=ev.stride,
        limit_tokens=ev.limit_tokens,
        model_name=getattr(info, "spec", None),
        progress=progress,
    )
    d = r.to_dict()
    return {
        "result": d,
        "window_nll": list(d.pop("window_nll_sums")),
        "window_tokens": list(d.pop("window_tokens")),
    }


def bench(
    model: Any, tokenizer: Any, info: Any, b: BenchSpec, progress: Progress | None
) -> dict[str, Any]:
    from joules.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        prompt_lens=(b.prompt_len,),
        gen_len=b.gen_len,
        batch_sizes=(b.batch,),
        repeats=b.repeats,
        warmup=b.warmup,
        runtime=b.runtime,
    )
    return run_bench(model, tokenizer, info, cfg, progress=progress).to_dict()


def predict(
    model: Any, info: Any, manifest: dict[str, Any], hardware: str, b: BenchSpec | None
) -> dict[str, Any]:
    from joules.predict import ModelShape, Workload
    from joules.predict import predict as run_predict

    shape = ModelShape.from_config(model.config, name=getattr(info, "spec", None))
    workload = Workload(prompt_len=b.prompt_len, gen_len=b.gen_len, batch=b.batch) if b else None
    compressed = manifest if manifest.get("recipe") != BASELINE else None
    return run_predict(shape, hardware, workload, manifest=compressed).to_dict()


def baseline_manifest(model: Any, info: Any) -> dict[str, Any]:
    """The model as loaded: bytes of its parameters and buffers, and where its weights came from."""
    params = list(model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    n_params = sum(p.numel() for p in params)
    pq = getattr(info, "prequantized", None)
    return {
        "recipe": BASELINE,
        "model_bytes": nbytes,
        "bits_per_weight": 8.0 * sum(p.numel() * p.element_size() for p in params) / n_params,
        "dtype": str(next(iter(params)).dtype).removeprefix("torch."),
        "prequantized": pq,
        "layers": {},
        "note": f"as loaded; its weights were {pq} in the source file before joules saw them"
        if pq
        else "as loaded",
    }


def default_stages() -> Stages:
    """Stages over the installed joules library; absent modules are listed in ``missing``."""
    import importlib

    missing: dict[str, str] = {}

    def have(stage: str, module: str, *names: str) -> bool:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing[stage] = f"{module} is not installed ({exc})"
            return False
        for n in names:
            if not hasattr(mod, n):
                missing[stage] = f"{module} has no {n}"
                return False
        return True

    has_compress = have("compress", "joules.compress", "compress", "parse_recipe")
    if has_compress and not have("calibration", "joules.compress", "calibration_tokens"):
        has_compress = False
    elif not has_compress:
        missing["calibration"] = missing["compress"]
    return Stages(
        load=load,
        calibration=calibration if has_compress else None,
        compress=compress if has_compress else None,
        evaluate=evaluate,
        bench=bench if have("bench", "joules.bench", "BenchConfig", "run_bench") else None,
        predict=predict if have("predict", "joules.predict", "predict") else None,
        baseline_manifest=baseline_manifest,
        layer_paths=layer_paths if has_compress else None,
        missing=missing,
    )
