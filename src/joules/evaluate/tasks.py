"""Evaluation tasks by name: one registered ``@dataclass`` config per task, run on a loaded model.

    >>> from joules.models import tiny_model
    >>> from joules.evaluate import tasks
    >>> model, tok, info = tiny_model()
    >>> r = tasks.run_task("wikitext2", model, tok, info, window=64, limit_tokens=128)
    >>> r.windows, sorted(tasks.names())
    (2, ['attention-deviation', 'deviation', 'hellaswag', 'wikitext2'])
    >>> tasks.get("hellaswag", limit=4).limit
    4

``run_task(name, model, tokenizer, info, **options)`` builds the task's config from ``options``
(unknown options raise :class:`~joules.errors.ConfigError` naming the valid ones) and returns
its typed result (``PerplexityResult``, ``ChoiceResult``, ``DeviationResult``,
``AttentionDeviationResult``), each with ``to_dict()``. ``get(name, **options)`` returns the
config alone; ``config.run(model, tokenizer, info)`` runs it. A new task is a dataclass with
``run`` decorated with ``@register("name")``; that class is all ``joules eval`` and the sweep
need: the CLI's ``--task`` choices are :func:`names`, a result is printed by the class's
``render`` (default: :func:`joules.evaluate.render.render_fields`) and the progress bar counts its
``progress_unit``.

``default_dtype`` says which compute dtype a task wants when the user names none: ``"fp32"`` for
every task. A quality figure must not depend on a timing probe, so ``joules eval`` never picks
the dtype by speed unless asked (``--dtype auto``, recorded in the protocol's ``dtype_choice``).
fp32 is also what the sweep (``dtype = "float32"``) and the lm-eval adapter default to, and what
every committed table used; a bf16 checkpoint upcast to fp32 is exact, so the figure measures
the weights, not the CPU's bf16 arithmetic (and on an AVX2-only CPU fp32 is the fast path too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, ClassVar

from rich.console import RenderableType

from joules import dtypes
from joules.errors import ConfigError
from joules.evaluate.render import (
    render_attention,
    render_choice,
    render_deviation,
    render_fields,
    render_perplexity,
)
from joules.registry import Registry

Progress = Callable[[int, int], None]
TASKS: Registry[type[Task]] = Registry("task")


class Task:
    """Base of every task config: a registered dataclass with ``run``.

    ``progress_unit`` names what ``run``'s ``progress(done, total)`` counts (the CLI's progress
    bar label); :meth:`render` turns a result into what ``joules eval`` prints.
    """

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True
    default_dtype: ClassVar[str] = "fp32"
    progress_unit: ClassVar[str] = "tokens"

    def run(self, model: Any, tokenizer: Any, info: Any, progress: Progress | None = None) -> Any:
        raise NotImplementedError

    @classmethod
    def render(cls, result: Any) -> RenderableType:
        """``result`` as a rich renderable (the CLI prints it): by default its scalar fields."""
        return render_fields(result, f"{cls.name}: {type(result).__name__}")


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a task config under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        TASKS.register(name, cls)
        cls.name = name
        return cls

    return deco


def names() -> list[str]:
    """The registered task names, in registration order."""
    return TASKS.names()


def task_class(name: str) -> type[Task]:
    return TASKS.get(name)


def options(name: str) -> list[str]:
    """The option names task ``name`` accepts (its config's fields)."""
    return [f.name for f in dataclasses.fields(task_class(name))]


def get(name: str, **opts: Any) -> Task:
    """The config of task ``name`` with ``opts`` set (the rest at their defaults)."""
    cls = task_class(name)
    unknown = sorted(set(opts) - set(options(name)))
    if unknown:
        raise ConfigError(
            f"task {name!r} has no option {', '.join(unknown)}: its options are "
            + ", ".join(options(name))
        )
    return cls(**opts)


def run_task(
    name: str,
    model: Any,
    tokenizer: Any,
    info: Any,
    *,
    progress: Progress | None = None,
    **opts: Any,
) -> Any:
    """Run task ``name`` on a loaded model and return its typed result (with ``to_dict()``)."""
    return get(name, **opts).run(model, tokenizer, info, progress=progress)


def _spec(info: Any, model: Any) -> str:
    spec = getattr(info, "spec", None)
    if spec:
        return str(spec)
    return getattr(getattr(model, "config", None), "_name_or_path", "") or "model"


def _dtype_name(model: Any) -> str:
    from joules.evaluate.scoring import model_dtype

    return dtypes.short_name(model_dtype(model))


def _text(data: str | None, split: str) -> tuple[str, str, str | None]:
    """(text, dataset name, split) of the shipped WikiText-2 split or a user's file."""
    from joules.data import load_text

    if data:
        return load_text(data), data, None
    return load_text("wikitext2", split), "wikitext2", split


@register("wikitext2")
@dataclass
class Wikitext2(Task):
    """Perplexity on WikiText-2 ``split`` (or the text file ``data``); see ``perplexity.py``."""

    data: str | None = None
    split: str = "test"
    window: int = 1024
    stride: int | None = None
    limit_tokens: int | None = None
    add_bos: bool | None = None
    batch_size: int | None = None

    @classmethod
    def render(cls, result: Any) -> RenderableType:
        return render_perplexity(result)

    def run(self, model: Any, tokenizer: Any, info: Any, progress: Progress | None = None) -> Any:
        from joules.evaluate.perplexity import perplexity

        text, dataset, split = _text(self.data, self.split)
        return perplexity(
            model,
            tokenizer,
            text,
            window=self.window,
            stride=self.stride,
            limit_tokens=self.limit_tokens,
            add_bos=self.add_bos,
            batch_size=self.batch_size,
            dataset=dataset,
            split=split,
            model_name=_spec(info, model),
            progress=progress,
        )


@register("hellaswag")
@dataclass
class Hellaswag(Task):
    """lm-eval's acc / acc_norm / acc_bytes on HellaSwag validation (or a JSONL ``data`` file)."""

    progress_unit: ClassVar[str] = "items"

    @classmethod
    def render(cls, result: Any) -> RenderableType:
        return render_choice(result)

    data: str | None = None
    limit: int | None = None
    seed: int = 1234
    add_bos: bool | None = None
    kv_reuse: bool = True

    def run(self, model: Any, tokenizer: Any, info: Any, progress: Progress | None = None) -> Any:
        from joules.data import load_choice
        from joules.evaluate.choice import choice_accuracy

        return choice_accuracy(
            model,
            tokenizer,
            load_choice(self.data or "hellaswag"),
            limit=self.limit,
            seed=self.seed,
            add_bos=self.add_bos,
            kv_reuse=self.kv_reuse,
            dataset=self.data or "hellaswag",
            model_name=_spec(info, model),
            progress=progress,
        )


@register("deviation")
@dataclass
class Deviation(Task):
    """KL divergence (mean, interval, median, p99, max), same top token, perplexity ratio and
    layer SQNR of the model against a reference; through torch or llama.cpp (``runtime``).

    ``runtime="torch"`` (default): the reference is ``reference`` (a model spec, loaded in fp32,
    or a model already loaded); without one, the model itself as loaded when ``weights_format``
    is set (so only the format differs), else the model's own spec reloaded in fp32 (so the
    dtype is what differs). Both run side by side (exact distributions, SQNR per module).

    ``runtime="llamacpp"`` (or another registered logit runtime, see
    :mod:`joules.evaluate.kld`): the model is a ``.gguf`` file (a path as ``model``, or the
    GGUF the model was loaded from) run by llama.cpp; the reference is a spec or path (a GGUF
    file runs in the same runtime, a Hugging Face or joules directory in torch fp32; default:
    the model's own file). The reference's log-probs are computed once per file and protocol
    and stored compactly as ``llama-perplexity --kl-divergence-base`` does
    (``cache_reference``). ``scored="second-half"`` is llama-perplexity's own protocol.
    """

    reference: Any = None
    weights_format: str | None = None
    data: str | None = None
    split: str = "test"
    window: int = 1024
    limit_tokens: int | None = None
    add_bos: bool | None = None
    sqnr: str = "linear"
    scored: str = "all"
    runtime: str = "torch"
    threads: int | None = None
    cache_reference: bool = True

    @classmethod
    def render(cls, result: Any) -> RenderableType:
        return render_deviation(result)

    def reference_model(self, model: Any, info: Any) -> tuple[Any, str]:
        """The reference model and its label (spec and dtype)."""
        import torch

        from joules.models import load_model

        spec, dtype = _spec(info, model), _dtype_name(model)
        if self.reference is not None and not isinstance(self.reference, (str, PathLike)):
            return self.reference, f"reference ({_dtype_name(self.reference)})"
        if self.reference:
            ref = str(self.reference)
            return load_model(ref, dtype=torch.float32).model, f"{ref} (fp32)"
        if self.weights_format or dtype == "fp32":
            return model, f"{spec} ({dtype})"
        if getattr(info, "spec", None) is None:
            raise ConfigError(
                "deviation needs a reference: pass reference=SPEC or a weights_format, or the "
                "model's ModelInfo so its fp32 copy can be loaded"
            )
        return load_model(info.spec, dtype=torch.float32).model, f"{spec} (fp32)"

    def run(self, model: Any, tokenizer: Any, info: Any, progress: Progress | None = None) -> Any:
        if self.runtime != "torch":
            return self._run_file(model, tokenizer, info, progress)
        from joules.evaluate.deviation import deviation, format_transform, transformed_copy

        transform = format_transform(self.weights_format) if self.weights_format else None
        ref, ref_name = self.reference_model(model, info)
        dtype = _dtype_name(model)
        if transform is not None:
            model = transformed_copy(model, transform)
        text, dataset, _ = _text(self.data, self.split)
        name = _spec(info, model)
        if self.weights_format:
            name += f" ({self.weights_format}, emulated)"
        return deviation(
            model,
            ref,
            tokenizer,
            text,
            window=self.window,
            limit_tokens=self.limit_tokens,
            add_bos=self.add_bos,
            sqnr_modules=self.sqnr,
            scored=self.scored,
            dataset=dataset,
            model_name=f"{name} ({dtype})",
            reference_name=ref_name,
            transform_name=getattr(transform, "__name__", None),
            progress=progress,
        )

    def _run_file(self, model: Any, tokenizer: Any, info: Any, progress: Progress | None) -> Any:
        """KL divergence of a model file run by ``self.runtime`` against a stored reference."""
        import dataclasses

        from joules.evaluate.kld import (
            TokenProtocol,
            kl_divergence,
            logit_source,
            reference_logprobs,
        )
        from joules.models.loading import resolve

        if self.weights_format:
            raise ConfigError(
                f"weights_format emulates a format in torch: use runtime=torch with it, not "
                f"{self.runtime}"
            )
        path = self._model_file(model, info)
        # llama-perplexity's chunks are `window` long; a prepended BOS (all) makes one more
        n_ctx = self.window + (0 if self.scored == "second-half" else 1)
        ref_spec = self.reference if self.reference is not None else path
        if isinstance(ref_spec, (str, PathLike)):
            kind, ref_path = resolve(ref_spec)
            ref_runtime = self.runtime if kind == "gguf" else "torch"
            src = logit_source(ref_runtime, ref_path, n_ctx=n_ctx, threads=self.threads)
            key = _file_key(ref_runtime, ref_path) if self.cache_reference else None
            ref_name = f"{ref_spec} ({'fp32' if ref_runtime == 'torch' else ref_runtime})"
        else:  # a torch model already loaded: no identity to key a store by
            src = logit_source("torch", ref_spec, n_ctx=n_ctx)
            key, ref_name = None, f"reference ({_dtype_name(ref_spec)})"
        text, dataset, _ = _text(self.data, self.split)
        protocol = TokenProtocol(self.window, self.scored, self.add_bos, self.limit_tokens, dataset)
        ref = reference_logprobs(src, tokenizer, text, protocol, key=key, progress=progress)
        del src  # one model in memory at a time: the reference's is freed before the test's loads
        test = logit_source(self.runtime, path, n_ctx=n_ctx, threads=self.threads)
        r = kl_divergence(
            test, ref, progress, model_name=f"{path} ({self.runtime})", reference_name=ref_name
        )
        return dataclasses.replace(
            r, protocol=dataclasses.replace(r.protocol, dtype_choice=f"{self.runtime} file")
        )

    def _model_file(self, model: Any, info: Any) -> str:
        if isinstance(model, (str, PathLike)):
            return str(model)
        gguf = getattr(info, "gguf_file", None)
        if gguf:
            return str(gguf)
        raise ConfigError(
            f"runtime {self.runtime} evaluates a .gguf file: pass its path as the model "
            "(joules export DIR --to gguf -o model.gguf)"
        )


def _file_key(runtime: str, path: Any) -> str:
    """A store key for the reference at ``path``: its resolved path, size and modification
    time (of a directory: its files' total size and latest time), so a rewritten model gets a
    new store."""
    from pathlib import Path

    p = Path(path).resolve()
    files = [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p]
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime_ns for s in stats), default=0)
    return f"{runtime}:{p}:{size}:{mtime}"


@register("attention-deviation")
@dataclass
class AttentionDeviation(Task):
    """Attention implementations' deviation from fp64 standard attention (no model needed)."""

    needs_model: ClassVar[bool] = False
    progress_unit: ClassVar[str] = "attention grid"

    @classmethod
    def render(cls, result: Any) -> RenderableType:
        return render_attention(result)

    seq_lens: Sequence[int] = (128, 256, 512, 1024, 2048, 4096)
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16")
    block_sizes: Sequence[int] = (64, 128)
    weights_format: str | None = None  # comma-separated formats to emulate besides ``dtypes``
    heads: int = 4
    seed: int = 1234

    def run(
        self,
        model: Any = None,
        tokenizer: Any = None,
        info: Any = None,
        progress: Progress | None = None,
    ) -> Any:
        from joules.evaluate.attention import attention_deviation, format_round

        fmts = {}
        if self.weights_format:
            specs = [f.strip() for f in self.weights_format.split(",") if f.strip()]
            fmts = {f: format_round(f) for f in specs}
        return attention_deviation(
            list(self.seq_lens),
            list(self.dtypes),
            list(self.block_sizes),
            heads=self.heads,
            seed=self.seed,
            formats=fmts,
            progress=progress,
        )


__all__ = ["Task", "get", "names", "options", "register", "run_task", "task_class"]
