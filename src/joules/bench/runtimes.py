"""Runtimes: how a model turns a prompt into tokens, behind one small seam shared by bench.

    >>> import torch
    >>> from joules.models import tiny_model
    >>> from joules.bench.runtimes import get_runtime
    >>> model, _, _ = tiny_model("llama", seed=0)
    >>> rt = get_runtime("eager")(model, batch=1, max_len=24)
    >>> first, state = rt.prefill(torch.full((1, 16), 65))     # first: [B]
    >>> nxt, state = rt.decode_step(first, state)               # one token more
    >>> nxt.shape
    torch.Size([1])

A runtime is built for one (batch, max_len) shape, then runs any number of greedy generations:
``prefill(ids [B, P]) -> (first token [B], state)`` then ``decode_step(token [B], state) ->
(next token [B], state)``. ``prepare(ids)`` does the one-time work (allocating a static cache,
compiling) outside the timed span; ``sync()`` waits for the device. All runtimes decode greedily
and ignore EOS, so every run generates the same number of tokens.

- ``eager``: the transformers model called step by step with a dynamic KV cache, exactly what
  ``model.generate(do_sample=False)`` does (tested token for token).
- ``compiled``: gpt-fast style: a static KV cache allocated once and one ``torch.compile``d step
  function (``fullgraph``, static shapes: one graph for prefill per prompt length, one for
  decode). Inductor's compiled artefacts are cached on disk under
  ``$JOULES_CACHE_DIR/inductor``, so only the first run of a shape pays the compile.

- ``llamacpp``: a ``.gguf`` file run by llama.cpp (``joules.bench.llamacpp_runtime``, registered
  by ``joules.bench``'s ``__init__``; needs the ``[llamacpp]`` extra only when it runs).

Adding a runtime (the deploy issue adds ``llamacpp``): subclass :class:`Runtime`, implement
``prefill``/``decode_step``, decorate with ``@register_runtime("name")``. A runtime that does
not run a torch module may accept ``model`` as anything it can load (e.g. a GGUF path) and
overrides the classmethod ``model_facts`` (cost, compute dtype, linear paths: what computed the
matmuls).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from joules import dtypes
from joules.bench.roofline import model_cost
from joules.compress.modules.linear import linear_paths, prepack
from joules.errors import ConfigError
from joules.models import load_model
from joules.models.hf_cache import cache_kwarg, output_cache
from joules.paths import cache_dir
from joules.registry import Registry

RUNTIMES: Registry[type[Runtime]] = Registry("runtime")
_TORCH_DTYPES = dtypes.choices("fp32", "bf16")  # the dtypes `--dtype` may cast a model to


def register_runtime(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Class decorator: make a :class:`Runtime` available by ``name``."""

    def deco(cls: type[Runtime]) -> type[Runtime]:
        RUNTIMES.register(name, cls)
        cls.name = name
        return cls

    return deco


def runtime_names() -> list[str]:
    """The registered runtime names, sorted."""
    return RUNTIMES.names(sort=True)


def get_runtime(name: str) -> type[Runtime]:
    return RUNTIMES.get(name)


def _resolve_dtype(model: Any, dtype: str) -> torch.dtype:
    current = next(model.parameters()).dtype
    if dtype == "auto":
        return current
    target = _TORCH_DTYPES[dtype]
    if current != target:
        model.to(target)
    return target


def _short(dt: torch.dtype | None) -> str | None:
    """fp32/bf16/fp16 for those dtypes, else None (only they name a matmul's dtype here)."""
    return dtypes.short_name(dt) if dt in (torch.float32, torch.bfloat16, torch.float16) else None


def _matmul_dtype(model: Any, act_dtype: torch.dtype) -> str:
    """The dtype the matmuls compute in: compressed layers' ``compute_dtype`` if any say so."""
    seen = Counter(
        _short(getattr(m, "compute_dtype", None))
        for m in model.modules()
        if getattr(m, "compute_dtype", None) is not None
    )
    seen.pop(None, None)
    if seen:
        return seen.most_common(1)[0][0]
    return _short(act_dtype) or str(act_dtype)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class Runtime(ABC):
    """Greedy generation of a fixed shape, split into prefill and decode steps.

    ``takes_torch_model``: the runtime runs the torch module :func:`load_model` returns (a
    sweep benches the model it compressed, so its ``[bench] runtime`` may name only these); a
    runtime that loads its own file (llamacpp: a ``.gguf``) sets it False.
    """

    name: str = "runtime"
    takes_torch_model: ClassVar[bool] = True

    def __init__(self, model: Any, *, batch: int, max_len: int) -> None:
        self.model = model
        self.batch = batch
        self.max_len = max_len
        self.device = _device(model)
        self.notes: list[str] = []  # what the result should say about this runtime's run

    @classmethod
    def load(cls, spec: Any) -> tuple[Any, Any, Any]:
        """``(model, tokenizer, ModelInfo)`` of a model spec, as this runtime takes the model."""
        lm = load_model(spec)
        return lm.model, lm.tokenizer, lm.info

    @classmethod
    def model_facts(cls, model: Any, info: Any, dtype: str) -> tuple[Any, str]:
        """``(ModelCost, compute dtype name)`` of ``model`` as this runtime runs it; ``dtype``
        other than "auto" casts a torch model in place. A runtime that does not run a torch
        module overrides this and :meth:`linear_paths` (and refuses a model it cannot run)."""
        act_dtype = _resolve_dtype(model, dtype)
        # compressed layers' kernels pick their activation dtype on first use: pick it now, so
        # the compute dtype (and the prefill's compute limit) is the one they will run in; a
        # layer with no kernel decodes its weight once (timed forwards then time the model, not
        # the format's decoder; the layer still reports `emulated`)
        prepack(model, act_dtype, decode_emulated=True)
        return model_cost(model, info, act_dtype), _matmul_dtype(model, act_dtype)

    @classmethod
    def linear_paths(cls, model: Any) -> dict[str, int]:
        """What computed the matmuls, per path, after the runs (kernels pick their path lazily)."""
        return linear_paths(model, dense=True)

    def prepare(self, ids: torch.Tensor) -> None:  # noqa: B027 - nothing to prepare by default
        """One-time work before timing (allocate caches, compile); ``ids`` shows the shape."""

    def reset(self) -> None:  # noqa: B027 - stateless by default
        """Forget the previous generation (called before each run, outside the timed span)."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the prompt ``ids`` [B, P]; return the first generated token [B] and the state."""

    @abstractmethod
    def decode_step(self, token: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed ``token`` [B]; return the next token [B] and the new state."""

    def sync(self) -> None:
        """Wait until queued device work is done (timers must not run ahead of a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy ``new_tokens`` tokens after ``ids`` [B, P] -> [B, new_tokens] (untimed)."""
        self.reset()
        tok, state = self.prefill(ids)
        out = [tok]
        for _ in range(new_tokens - 1):
            tok, state = self.decode_step(tok, state)
            out.append(tok)
        return torch.stack(out, dim=1)


@register_runtime("eager")
class EagerRuntime(Runtime):
    """The transformers model, step by step, with a dynamic KV cache (= ``generate``)."""

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        kw = {cache_kwarg(self.model): cache}
        out = self.model(input_ids=ids, **kw, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), output_cache(out)

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        kw = {cache_kwarg(self.model): state}
        out = self.model(input_ids=token[:, None], **kw, use_cache=True)
        return out.logits[:, -1].argmax(-1), output_cache(out)


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels: ``$JOULES_CACHE_DIR/inductor`` (set before the
    first compile; an explicit ``TORCHINDUCTOR_CACHE_DIR`` wins)."""
    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    os.makedirs(path, exist_ok=True)
    return path


@register_runtime("compiled")
class CompiledRuntime(Runtime):
    """gpt-fast style: a static KV cache and one ``torch.compile``d greedy step.

    Both phases go through the same step function ``(ids [B, S], positions [S]) -> token [B]``;
    with static shapes dynamo specialises it once per S (the prompt length, and 1 for decode).
    The cache lives in the runtime; ``reset`` must run before each prefill (transformers' static
    layers also count the positions written so far).
    """

    def __init__(self, model: Any, *, batch: int, max_len: int) -> None:
        super().__init__(model, batch=batch, max_len=max_len)
        self.cache: Any = None
        self._step: Callable[..., torch.Tensor] | None = None

    def _build(self, fullgraph: bool = True) -> None:
        from transformers import StaticCache

        inductor_cache_dir()
        import torch._dynamo

        # Each (batch, prompt length) is one more graph of the same step function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        model, cache = self.model, self.cache
        cache_kw = cache_kwarg(model)  # a constant string inside the compiled step

        def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            # ids: [B, S], positions: [S] -> next token [B]
            out = model(
                input_ids=ids,
                **{cache_kw: cache},
                cache_position=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].argmax(-1)

        self._step = torch.compile(step, fullgraph=fullgraph, dynamic=False)

    @torch.inference_mode()
    def prepare(self, ids: torch.Tensor) -> None:
        if self._step is None:
            self._build()
        # Compile (or load from the on-disk cache) both graphs now, outside the timed runs.
        try:
            self._warm(ids)
        except Exception as exc:  # a layer dynamo cannot trace whole (a kernel's Python dispatch)
            import torch._dynamo

            if not isinstance(exc, torch._dynamo.exc.Unsupported | torch._dynamo.exc.UserError):
                raise
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc)
            self.notes.append(f"compiled with graph breaks (fullgraph failed: {first})")
            self._build(fullgraph=False)
            self._warm(ids)

    def _warm(self, ids: torch.Tensor) -> None:
        self.reset()
        tok, state = self.prefill(ids)
        self.decode_step(tok, state)
        self.sync()

    @torch.inference_mode()
    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self._step is None:
            self._build()
        assert self._step is not None
        batch, length = ids.shape
        if batch != self.batch or length >= self.max_len:
            raise ConfigError(
                f"compiled runtime built for batch {self.batch} and {self.max_len} positions, "
                f"got ids of shape {tuple(ids.shape)}"
            )
        tok = self._step(ids, torch.arange(length, device=ids.device))
        return tok.clone(), length

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        assert self._step is not None
        pos = int(state)
        if pos >= self.max_len:
            raise ConfigError(f"static cache of {self.max_len} positions is full")
        tok = self._step(token[:, None], torch.tensor([pos], device=token.device))
        return tok.clone(), pos + 1
