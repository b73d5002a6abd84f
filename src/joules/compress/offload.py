"""Layer-by-layer compression: one decoder block's weights in memory at a time.

    >>> from joules.compress.offload import load_layered          # doctest: +SKIP
    >>> lm = load_layered("llama-8b-dir/")    # a skeleton: blocks on the meta device  # doctest: +SKIP
    >>> cm = compress(lm.model, "gptq(format=gguf-q4_0)", calib, lm.tokenizer, offload=lm.offload)  # doctest: +SKIP
    >>> cm.save("out/", lm.tokenizer)          # shard per block, moved, never re-read  # doctest: +SKIP

:func:`load_layered` builds the model on the meta device and reads nothing: every weight stays in
the checkpoint's safetensors files. Each calibrated pass reads the tensors outside the blocks
that its forward up to block 0 needs (the input embedding) and frees them again
(:meth:`Offload.outside_resident`); :class:`Offload` then materialises block ``i``
when a step needs it (:meth:`CompressContext.sequential` and ``each_target`` ask for it), in the
dtype the in-memory path would have loaded it in, so the compressed tensors are bit for bit those
of loading the whole model; after the step it writes the block's tensors (compressed or
changed) to its own safetensors file in a work directory beside the output and puts the block
back on the meta device. A later step reads the block back from that file. Saving moves those
files into the output directory as its shards (``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``), copies the tensors no step touched from the checkpoint, and
writes the manifest last.

Peak memory is one block in the checkpoint's dtype plus the step's fp32 working set (weights,
Hessians) plus the calibration activations (the embedding only while a pass starts), whatever
the depth. Steps that
need the whole model at once (a Fisher pass, a search over every tensor, a linear outside the
blocks) refuse this path in one line: :data:`joules.compress.recipe.Step.layered`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from joules.compress.context import decoder_layers
from joules.errors import UnsupportedModelError
from joules.models.info import ModelInfo, describe
from joules.models.loading import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    checkpoint_dir,
    safetensors_weight_map,
)
from joules.paths import cache_dir


class CheckpointTensors:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read one at a
    time through memory maps: nothing is resident but what :meth:`get` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = safetensors_weight_map(self.path)
        if not self.where:
            raise UnsupportedModelError(
                f"'{self.path}' has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}: "
                "layer-by-layer compression reads Hugging Face safetensors checkpoints"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as an owned copy (in ``dtype`` if given)."""
        from safetensors import safe_open

        if name not in self.where:
            raise UnsupportedModelError(
                f"'{self.path}' has no tensor '{name}': the checkpoint does not match its config"
            )
        with safe_open(str(self.where[name]), framework="pt") as f:
            t = f.get_tensor(name)
        if dtype is not None and t.dtype != dtype:
            return t.to(dtype)
        return t.clone()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Without it a block's freed working set stays in this process's RSS as heap
    fragments: measured on 8 blocks of 67 MB, RSS grew ~50 MB per block with no tensor alive,
    and fell back to the 1-block level after a trim."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def to_meta(modules: list[nn.Module]) -> None:
    """Replace every parameter and persistent buffer of ``modules`` by a meta tensor (shape and
    dtype kept), dropping compressed layers' decoded caches."""
    for m in modules:
        for k, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None and not b.is_meta and k not in m._non_persistent_buffers_set:
                m._buffers[k] = b.to("meta")
        invalidate = getattr(m, "invalidate", None)
        if callable(invalidate):
            invalidate()
        if getattr(m, "_mask_cache", None) is not None:  # a pruned layer's unpacked keep-mask
            m._mask_cache = None


def _safe_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s state dict with ``prefix`` on every key, each tensor contiguous and owning
    its storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    ptrs: set[int] = set()
    for k, v in module.state_dict().items():
        t = v.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in ptrs:
            t = t.clone()
        if t.numel():
            ptrs.add(t.untyped_storage().data_ptr())
        out[prefix + k] = t
    return out


class Offload:
    """Where each decoder block's tensors live between uses: in the checkpoint (untouched), in a
    block file of the work directory (written by a step), or resident (in use)."""

    def __init__(
        self,
        model: nn.Module,
        source: CheckpointTensors,
        work_root: Path | None = None,
    ) -> None:
        self.model = model
        self.source = source
        self.layers_name, self.layers = decoder_layers(model)
        # On disk, never /tmp (often a tmpfs: block files there would sit in memory); beside
        # the output when the caller knows it, so saving renames them instead of copying.
        root = Path(work_root) if work_root is not None else cache_dir() / "offload"
        root.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=".joules-blocks-", dir=root))
        self.written: dict[int, Path] = {}
        # the modules of each resident block when it was read: a step that replaces a linear
        # (by its compressed layer) may still hold the old one, whose weights must go too
        self.resident_blocks: dict[int, list[nn.Module]] = {}

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}."

    def block_file(self, i: int) -> Path:
        return self.work / f"block-{i:05d}.safetensors"

    def onload(self, i: int) -> nn.Module:
        """Materialise block ``i`` (from its block file if a step wrote one, else from the
        checkpoint in the dtype its skeleton has) and return it."""
        from safetensors.torch import load_file

        block = self.layers[i]
        if i in self.resident_blocks:
            return block
        prefix = self.block_prefix(i)
        if i in self.written:
            state = {k[len(prefix) :]: v for k, v in load_file(str(self.written[i])).items()}
        else:
            want = block.state_dict(keep_vars=True)
            state = {k: self.source.get(prefix + k, want[k].dtype) for k in want}
        block.load_state_dict(state, strict=True, assign=True)
        self.resident_blocks[i] = list(block.modules())
        return block

    def offload(self, i: int, changed: bool) -> None:
        """Put block ``i`` back on the meta device, first writing its tensors to its block file
        when ``changed`` (a step modified it)."""
        from safetensors.torch import save_file

        if i not in self.resident_blocks:
            return
        block = self.layers[i]
        if changed:
            path = self.block_file(i)
            tmp = path.with_suffix(".tmp")
            save_file(_safe_state(block, self.block_prefix(i)), str(tmp))
            os.replace(tmp, path)
            self.written[i] = path
        read = self.resident_blocks.pop(i)
        to_meta(list({id(m): m for m in [*read, *block.modules()]}.values()))
        release_freed_memory()

    @contextlib.contextmanager
    def resident(self, i: int, changed: bool = True) -> Iterator[nn.Module]:
        """Block ``i`` in memory inside; written back (if ``changed``) and freed on exit."""
        block = self.onload(i)
        try:
            yield block
        finally:
            self.offload(i, changed)

    def _outside_modules(self) -> list[nn.Module]:
        """The modules outside the decoder blocks that own parameters (embedding, final norm,
        head)."""
        prefix = self.layers_name + "."
        return [
            m
            for n, m in self.model.named_modules()
            if n and not n.startswith(prefix) and n != self.layers_name and m._parameters
        ]

    @contextlib.contextmanager
    def outside_resident(self) -> Iterator[None]:
        """The tensors outside the decoder blocks but the head (what a forward up to block 0
        reads: the input embedding) in memory inside, read from the checkpoint and freed on
        exit; a tied head is the embedding, tied again. Nothing outside the blocks is changed
        by a layered step, so the save copies them from the checkpoint."""
        state = self.model.state_dict(keep_vars=True)
        prefix = self.layers_name + "."
        head = _head_names(self.model)
        want = {
            k: v
            for k, v in state.items()
            if not k.startswith(prefix) and v.is_meta and k not in head and k in self.source
        }
        self.model.load_state_dict(
            {k: self.source.get(k, v.dtype) for k, v in want.items()}, strict=False, assign=True
        )
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        try:
            yield
        finally:
            to_meta(self._outside_modules())
            if getattr(self.model.config, "tie_word_embeddings", False):
                self.model.tie_weights()
            release_freed_memory()

    def close(self) -> None:
        """Delete the work directory (its block files are gone once a save moved them)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def __del__(self) -> None:  # a run that never saved leaves no block files behind
        with contextlib.suppress(Exception):
            self.close()

    # -- saving -----------------------------------------------------------------------------------
    def write_shards(self, directory: Path, tied: dict[str, str]) -> dict[str, str]:
        """Write the whole model into ``directory`` as one shard per decoder block plus one for
        the rest; returns the weight map (tensor name -> file). Block files are moved, blocks no
        step wrote are copied from the checkpoint; outside the blocks, resident tensors are
        written as they are and meta ones (the head) copied from the checkpoint. ``tied``: keys
        not written because they share another key's tensor."""
        from safetensors.torch import save_file

        n = len(self.layers) + 1
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for i in range(len(self.layers)):
            target = directory / names[i]
            if i in self.resident_blocks:
                self.offload(i, changed=True)
            prefix = self.block_prefix(i)
            want = self.layers[i].state_dict(keep_vars=True)  # the block file's keys, unprefixed
            if i in self.written:
                shutil.move(str(self.written.pop(i)), target)
            else:
                state = {prefix + k: self.source.get(prefix + k, v.dtype) for k, v in want.items()}
                save_file(state, str(target), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys((prefix + k for k in want), names[i]))
        rest: dict[str, torch.Tensor] = {}
        layer_prefix = self.layers_name + "."
        for k, v in self.model.state_dict(keep_vars=True).items():
            if k.startswith(layer_prefix) or k in tied:
                continue
            rest[k] = self.source.get(k, v.dtype) if v.is_meta else v.detach().contiguous()
        save_file(rest, str(directory / names[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, names[-1]))
        return weight_map


def _head_names(model: nn.Module) -> set[str]:
    """The state-dict names of the output head's parameters (``lm_head.weight``)."""
    head = model.get_output_embeddings()
    return {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m._parameters}


@dataclass
class LayeredModel:
    """A model skeleton whose decoder blocks stay in the checkpoint until a step needs them."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo
    offload: Offload


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` gives a checkpoint: its config's."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def checkpoint_bytes(spec: str | Path) -> int:
    """Bytes of the safetensors files behind an uncompressed model spec (what loading it whole
    would put in memory, in its dtype)."""
    path, _, _ = checkpoint_dir(spec)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def wants_layered(spec: str | Path, recipe: Any, memory_fraction: float = 0.25) -> bool:
    """Whether ``joules compress`` goes layer by layer by default: every step of ``recipe``
    runs so, ``spec`` is a dense checkpoint, and its bytes exceed ``memory_fraction`` of the
    memory available now (the in-memory path holds the model plus the steps' working set)."""
    import psutil

    if not all(s.layered for s in recipe.steps):
        return False
    try:
        size = checkpoint_bytes(spec)
    except UnsupportedModelError:  # a compressed directory: loaded whole
        return False
    return size > memory_fraction * psutil.virtual_memory().available


def load_layered(spec: str | Path, work_root: str | Path | None = None) -> LayeredModel:
    """Model ``spec`` (an HF directory, a GGUF file or preset: its cached conversion) on the
    meta device, its tensors read from the checkpoint by :class:`Offload` when a step needs them
    (checked present now). ``work_root``: where the block files go (the output's folder;
    default: the joules cache)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, gguf_file, gguf_types = checkpoint_dir(spec)
    source = CheckpointTensors(path)
    config = AutoConfig.from_pretrained(path)
    dtype = checkpoint_dtype(config)
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one meta parameter for the embedding and the head
    offload = Offload(model, source, Path(work_root) if work_root is not None else None)
    # nothing is read now: the blocks when a step needs them, the embedding for the forward up
    # to block 0 (Offload.outside_resident), the rest when saving
    head_names = _head_names(model)
    missing = [
        k for k, v in model.state_dict(keep_vars=True).items()
        if v.is_meta and k not in head_names and k not in source
    ]  # fmt: skip
    if missing:
        raise UnsupportedModelError(f"'{path}' has no tensors {missing[:3]}: is it complete?")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = describe(model, str(spec), str(path), gguf_file=gguf_file, gguf_types=gguf_types)
    return LayeredModel(model, tokenizer, info, offload)
