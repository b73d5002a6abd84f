"""The machinery every step shares: targets, calibration data, block-by-block execution.

    >>> from joules.models import tiny_model
    >>> from joules.compress.context import CompressContext, decoder_layers
    >>> model, tok, _ = tiny_model()
    >>> ctx = CompressContext(model, tok)
    >>> sorted(ctx.resolve_targets(("*.mlp.down_proj",)))
    ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']

Block-by-block (``ctx.sequential(fn)``): the calibration sequences run through the embedding once;
then for each decoder block i, ``fn(i, block, name, inputs)`` sees the hidden states entering
block i computed by blocks 0..i-1 *as already modified*, may change the block, and the block's
outputs are recomputed before block i+1. Only one block's activations are held at a time
(N x L x D floats, twice), never the whole model's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from joules import formats
from joules.compress.manifest import Manifest
from joules.compress.modules.linear import CompressedLinear, decoded
from joules.data import load_text
from joules.data.tokens import tokenize_stream
from joules.errors import ConfigError, UnsupportedModelError
from joules.models.hf_cache import CACHE_KWARGS

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM and their dotted name (``model.layers``)."""
    for name, m in model.named_modules():
        if name.endswith("layers") and isinstance(m, nn.ModuleList) and len(m) > 0:
            return name, m
    raise ConfigError(
        f"cannot find the decoder blocks of {type(model).__name__}: joules compresses "
        "transformer LMs with a `layers` ModuleList (llama, qwen2, mistral, phi3...)"
    )


def decoded_once(block: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Inside, the block's compressed linears compute with their weight decoded once, in the
    activations' dtype as given (fp32), instead of a kernel: calibration pushes thousands of
    tokens per forward through one block (see :func:`decoded`)."""
    return decoded(block, cache=True)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | CompressedLinear)


# The tokenized WikiText-2 valid split per tokenizer object (tokenizing it takes seconds).
_VALID_STREAMS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def calibration_tokens(
    tokenizer: Any,
    n: int = 128,
    length: int = 256,
    seed: int = 0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` random windows of ``length`` tokens from WikiText-2 **valid** (never test).

    Returns the tokens ``[n, length]`` and a description with its sha256 (for manifests and
    caches).
    """
    if n < 1 or length < 2:
        raise ConfigError(f"calibration needs n >= 1 and length >= 2, got n={n}, length={length}")
    if max_length is not None and length > max_length:
        raise ConfigError(
            f"calibration length {length} is longer than the model's context ({max_length} "
            f"tokens): pass --calib-len {max_length} or less"
        )
    ids = torch.tensor(
        tokenize_stream(tokenizer, load_text("wikitext2", "valid")), dtype=torch.long
    )
    if len(ids) < length + 1:
        raise ConfigError(f"WikiText-2 valid has only {len(ids)} tokens: use --calib-len < that")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n,), generator=g)
    tokens = torch.stack([ids[s : s + length] for s in starts.tolist()])
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    desc = {"dataset": "wikitext2", "split": "valid", "n": n, "length": length, "seed": seed}
    desc["sha256"] = digest
    return tokens, desc


@dataclass(frozen=True, eq=False)
class _Captured:
    """One distinct linear input of a mini-batch, and what keeps its key unambiguous.

    ``source`` and ``act_quant`` are held only so that they stay alive while the entry exists:
    then no later tensor of the block can be given the same storage address, and no other
    quantizer the same ``id``. Without this, in bf16/fp16 (where ``.float()`` copies and the
    source is freed) the allocator handed ``o_proj``'s or the post-attention norm's output the
    address of an earlier input, and gate/up were given the q/k/v input (issue 25).
    """

    source: torch.Tensor
    act_quant: Any
    x2d: torch.Tensor  # [tokens, in_features] fp32, shared by every module fed ``source``
    version: int  # ``source._version`` when captured
    name: str  # the first module fed it (for the error below)

    def check_unchanged(self) -> None:
        """In fp32 ``x2d`` is a view of ``source`` (no copy): an in-place write to it later in
        the block would change what consumers read. No supported block does that; fail loudly
        rather than calibrate on other values if one ever does."""
        aliased = self.x2d.untyped_storage().data_ptr() == self.source.untyped_storage().data_ptr()
        if aliased and self.source._version != self.version:
            raise UnsupportedModelError(
                f"the input of '{self.name}' is modified in place later in its decoder block: "
                "joules cannot capture this architecture's calibration inputs"
            )


def _input_key(x: torch.Tensor, act_quant: Any) -> tuple[Any, ...]:
    """What identifies the same input while its source is alive: the same memory, read the same
    way (address, dtype, shape, strides: one storage can hold several views), not written in
    place since (the version counter, shared by views), through the same quantizer."""
    return (
        x.device,
        x.data_ptr(),
        x.dtype,
        tuple(x.shape),
        x.stride(),
        x._version,
        id(act_quant),
    )


@dataclass
class BlockInputs:
    """The calibration hidden states entering one decoder block, in mini-batches."""

    hidden: list[torch.Tensor]  # each [b, L, D]
    kwargs: list[dict[str, Any]]  # the block's keyword arguments per mini-batch

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """Run ``block`` on every mini-batch; returns the outputs (same shapes)."""
        outs = []
        with torch.no_grad(), decoded_once(block):
            for h, kw in zip(self.hidden, self.kwargs, strict=True):
                out = block(h, **kw)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def batches(
        self, block: nn.Module, modules: dict[str, nn.Module]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Run ``block`` once per mini-batch; yield ``{name: x2d}``, each module's input.

        ``x2d`` is ``[tokens, in_features]`` in fp32. Modules fed the same tensor (q/k/v,
        gate/up) get the same object within a mini-batch, so consumers can share work between
        them (and only then: distinct inputs are distinct objects). Consumers accumulate
        statistics (Hessians, means) as batches stream by: nothing larger than one mini-batch
        is held.
        """
        buf: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], _Captured] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                # A linear that quantizes its input (act_quant) sees the quantized input.
                aq = getattr(_m, "act_quant", None)
                key = _input_key(x, aq)
                entry = seen.get(key)
                if entry is None:
                    x2d = (aq(x) if aq is not None else x).reshape(-1, x.shape[-1]).float()
                    entry = seen[key] = _Captured(x, aq, x2d, x._version, name)
                buf[name] = entry.x2d

            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            with torch.no_grad(), decoded_once(block):
                for h, kw in zip(self.hidden, self.kwargs, strict=True):
                    block(h, **kw)
                    for entry in seen.values():
                        entry.check_unchanged()
                    yield dict(buf)
                    buf.clear()
                    seen.clear()
        finally:
            for hd in handles:
                hd.remove()

    def capture(self, block: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """All inputs of ``modules`` as ``[tokens, in_features]`` fp32 (small models/tests)."""
        acc: dict[str, list[torch.Tensor]] = {}
        for batch in self.batches(block, modules):
            for name, x in batch.items():
                acc.setdefault(name, []).append(x)
        return {k: torch.cat(v) for k, v in acc.items()}


class _Stop(Exception):
    pass


class CompressContext:
    """What a step sees: the model, its tokenizer, calibration tokens and the manifest."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        calibration: torch.Tensor | None = None,
        manifest: Manifest | None = None,
        progress: ProgressFn | None = None,
        batch_size: int = 8,
        offload: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.manifest = manifest or Manifest()
        self.progress = progress
        self.batch_size = batch_size
        self.layers_name, self.layers = decoder_layers(model)
        # layer by layer (joules.compress.offload.Offload): blocks live on the meta device and
        # are materialised only inside ``sequential`` / ``each_target``
        self.offload = offload

    def _resident(self, i: int, changed: bool = True) -> contextlib.AbstractContextManager[Any]:
        """Block ``i`` in memory inside (layer by layer: read, then written back if ``changed``
        and freed on exit; else a no-op)."""
        if self.offload is None:
            return contextlib.nullcontext(self.layers[i])
        return self.offload.resident(i, changed)

    def each_target(self, targets: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
        """``targets.items()`` with each module's decoder block in memory while it is yielded
        (layer by layer a block at a time, in block order; a target outside every block is
        refused there, as the head is never materialised)."""
        if self.offload is None:
            yield from targets.items()
            return
        groups, outside = self.split_by_block(targets)
        if outside:
            raise ConfigError(
                f"'{next(iter(outside))}' is outside the decoder blocks: layer-by-layer "
                "compression quantizes linears inside them (compress in memory to include it)"
            )
        for i in sorted(groups):
            with self._resident(i):
                for rel, m in groups[i].items():
                    yield f"{self.layers_name}.{i}.{rel}", m

    # -- targets ---------------------------------------------------------------------------------
    def default_targets(self) -> dict[str, nn.Module]:
        prefix = self.layers_name + "."
        return {
            n: m for n, m in self.model.named_modules() if n.startswith(prefix) and _is_linear(m)
        }

    def resolve_targets(self, patterns: tuple[str, ...] = ()) -> dict[str, nn.Module]:
        """Linears named by glob ``patterns`` (default: every linear inside the decoder blocks).

        A pattern that matches nothing is an error naming a few valid names.
        """
        if not patterns:
            found = self.default_targets()
            if not found:
                raise ConfigError("the model has no linear layers inside its decoder blocks")
            return found
        modules = dict(self.model.named_modules())
        out: dict[str, nn.Module] = {}
        for pat in patterns:
            hits = {n: m for n, m in modules.items() if n and fnmatch.fnmatchcase(n, pat)}
            if not hits:
                linears = [n for n, m in modules.items() if _is_linear(m)]
                raise ConfigError(
                    f"target pattern '{pat}' matches no module: module names look like "
                    f"{', '.join(linears[:3])}, ..., {linears[-1]} (use glob patterns, e.g. '*.mlp.*')"
                )
            bad = [n for n, m in hits.items() if not _is_linear(m)]
            if bad and all(not _is_linear(m) for m in hits.values()):
                raise ConfigError(
                    f"target pattern '{pat}' matches '{bad[0]}', a {type(hits[bad[0]]).__name__}: "
                    "steps compress linear layers (name lm_head or *_proj modules)"
                )
            out.update({n: m for n, m in hits.items() if _is_linear(m)})
        return out

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block holding module ``name`` (None for lm_head etc.)."""
        prefix = self.layers_name + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    def split_by_block(
        self, targets: dict[str, nn.Module]
    ) -> tuple[dict[int, dict[str, nn.Module]], dict[str, nn.Module]]:
        """(``targets`` inside decoder blocks, grouped by block index and keyed by their name
        inside the block, e.g. ``mlp.up_proj``: the names :meth:`sequential`'s ``fn`` sees under
        its ``block_name``; the targets outside every block, by full name)."""
        groups: dict[int, dict[str, nn.Module]] = {}
        outside: dict[str, nn.Module] = {}
        for name, m in targets.items():
            b = self.block_of(name)
            if b is None:
                outside[name] = m
            else:
                groups.setdefault(b, {})[name[len(f"{self.layers_name}.{b}.") :]] = m
        return groups, outside

    def by_block(
        self, targets: dict[str, nn.Module], outside: str
    ) -> dict[int, dict[str, nn.Module]]:
        """:meth:`split_by_block`'s groups, for a step that calibrates block by block: a target
        outside every block raises ConfigError(``outside`` formatted with its ``name``)."""
        groups, out = self.split_by_block(targets)
        if out:
            raise ConfigError(outside.format(name=next(iter(out))))
        return groups

    # -- calibration -------------------------------------------------------------------------------
    def require_calibration(self, step: str) -> torch.Tensor:
        if self.calibration is None:
            raise ConfigError(
                f"step '{step}' needs calibration data: pass calibration=calibration_tokens(tok) "
                "(the CLI does this; --calib-n / --calib-len size it)"
            )
        return self.calibration

    def _first_block_inputs(self, step: str) -> BlockInputs:
        calib = self.require_calibration(step)
        hidden: list[torch.Tensor] = []
        kwargs: list[dict[str, Any]] = []
        first = self.layers[0]

        def grab(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            hidden.append(args[0].detach() if args else kw.pop("hidden_states").detach())
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            kw["use_cache"] = False
            for name in (*CACHE_KWARGS, "past_key_value"):  # no cache during calibration
                kw.pop(name, None)
            kwargs.append(kw)
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                for b in range(0, len(calib), self.batch_size):
                    with contextlib.suppress(_Stop):
                        self.model(
                            input_ids=calib[b : b + self.batch_size].to(device), use_cache=False
                        )
        finally:
            handle.remove()
        return BlockInputs(hidden, kwargs)

    def sequential(
        self,
        fn: Callable[[int, nn.Module, str, BlockInputs], None],
        step: str = "step",
        blocks: set[int] | None = None,
    ) -> None:
        """Run ``fn`` on every decoder block in order with its calibration inputs (see module doc).

        ``blocks``: only these blocks call ``fn`` (the others still run to produce inputs);
        after the last block in ``blocks`` nothing more is computed.
        """
        if self.offload is None:
            inputs = self._first_block_inputs(step)
        else:  # the embedding is read for this and freed again (1 GB of bf16 for an 8B model)
            with self.offload.outside_resident():
                inputs = self._first_block_inputs(step)
        last = max(blocks) if blocks else len(self.layers) - 1
        for i in range(last + 1):
            called = blocks is None or i in blocks
            with self._resident(i, changed=called) as block:
                if called:
                    fn(i, block, f"{self.layers_name}.{i}", inputs)
                if i < last:
                    inputs = BlockInputs(inputs.run(block), inputs.kwargs)
            if self.progress:
                self.progress(step, i + 1, last + 1)

    def record(self, layer: str, **fields: Any) -> None:
        self.manifest.record(layer, **fields)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as fp32 (dequantized if it is already compressed)."""
    if isinstance(module, CompressedLinear):
        return module.dequantize_weight().float()
    return module.weight.detach().float()


def weight_mask(module: nn.Module) -> torch.Tensor | None:
    """The keep-mask of a pruned linear (``module.weight_mask``, True = kept), if any."""
    m = getattr(module, "weight_mask", None)
    return m.bool() if isinstance(m, torch.Tensor) else None


def install_quantized(
    ctx: CompressContext,
    name: str,
    module: nn.Module,
    qt: Any,
    method: str,
    sparse: nn.Module | None = None,
) -> CompressedLinear:
    """Replace linear ``name`` by a :class:`CompressedLinear` holding ``qt`` and record it.

    ``sparse``: a part stored beside the packed weight (``add_to(w)``, ``nbytes``), counted in
    the layer's bits/weight. An ``act_quant`` the linear carries moves onto the new layer.
    """
    if isinstance(module, CompressedLinear):
        raise ConfigError(
            f"'{name}' is already compressed ({module.spec}) by an earlier step: a recipe "
            "quantizes each layer once (narrow the step's targets)"
        )
    lin = CompressedLinear.from_linear(module, qt)
    mask = weight_mask(module)
    if mask is not None:
        lin.set_mask(mask)
    aq = getattr(module, "act_quant", None)
    if aq is not None:
        lin.act_quant = aq
    extra = 0
    if sparse is not None:
        lin.sparse = sparse
        extra = int(sparse.nbytes)
    replace_module(ctx.model, name, lin)
    fmt = formats.get(qt.spec)
    shape = tuple(qt.shape)
    bits = fmt.bits_per_element(shape) + 8 * extra / (shape[0] * shape[1])
    nbytes = int(qt.nbytes) + extra
    if mask is not None:  # the stored keep-bitmap costs one bit per weight
        bits += 1.0
        nbytes += int(lin.mask_bits.numel())
    ctx.record(
        name,
        method=method,
        format=qt.spec,
        shape=list(shape),
        bits_per_weight=bits,
        nbytes=nbytes,
        emulated=bool(getattr(fmt, "emulated", True)),
    )
    if sparse is not None:
        ctx.record(name, sparse_type=sparse.module_type, sparse_nbytes=extra)  # type: ignore[attr-defined]
    # Every quantizing step passes here: its layers' weight SQNR is recorded once, for all.
    ctx.manifest.record_weight_error(name, dense_weight(module), lin.dequantize_weight())
    return lin
