"""``compress(model, recipe, calibration)``: run a recipe, keep a manifest; save and reload.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress
    >>> model, tok, _ = tiny_model()
    >>> cm = compress(model, "rtn(format=int4-g32)")
    >>> cm.manifest.recipe, round(cm.manifest.bits_per_weight, 2)
    ('rtn(format=int4-g32)', 4.5)

``compress`` modifies ``model`` in place (compressed layers replace its linears) and returns it
with the :class:`~joules.compress.manifest.Manifest`. ``CompressedModel.save(dir, tokenizer)``
writes ``model.safetensors`` (packed codes, scales, extra parts; no pickle), ``joules.json``,
``config.json`` and the tokenizer; ``load_compressed(dir)`` (and so ``load_model(dir)``) rebuilds
the same modules and gives bit-identical logits. ``open_compressed(dir)`` reads nothing: its
:class:`CompressedWeights` hands out one module's or a few rows' tensors at a time (what
``joules export`` streams a directory with).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from joules.compress.context import CompressContext, ProgressFn, replace_module
from joules.compress.manifest import MANIFEST_FILE, Manifest
from joules.compress.modules.kernels import pinned_activations
from joules.compress.modules.linear import CompressedLinear, module_class
from joules.compress.offload import to_meta
from joules.compress.recipe import Recipe, parse_recipe, step_class, step_names
from joules.errors import ConfigError, UnsupportedModelError
from joules.fingerprint import compute_label, library_versions
from joules.models.info import synthetic_label
from joules.models.loading import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    register_loader,
    safetensors_weight_map,
)
from joules.registry import Registry
from joules.serialize import atomic_directory, atomic_write_json

# ``fn(model, cfg)`` re-applying manifest ``runtime[key]`` at load, by key.
RUNTIME_HOOKS: Registry[Any] = Registry("runtime hook")
# ``fn(model, directory)`` writing extra files into a save, by the function's qualified name.
SAVE_HOOKS: Registry[Any] = Registry("save hook")
WEIGHTS_FILE = SAFETENSORS_FILE
INDEX_FILE = SAFETENSORS_INDEX  # a layer-by-layer save: one shard per block
FILES_KEY = "files"  # manifest entry: bytes of every file the save wrote, checked at load


def register_save_hook(fn: Any) -> Any:
    """Register ``fn(model, directory)``, called after a compressed model is saved (extra files)."""
    return SAVE_HOOKS.register(f"{fn.__module__}.{fn.__qualname__}", fn)


def register_runtime_hook(key: str) -> Any:
    """Register ``fn(model, cfg)`` that re-applies manifest ``runtime[key]`` at load."""

    return RUNTIME_HOOKS.register(key)


class PeakRSS:
    """Sampled high-water mark of this process's resident memory while the block runs."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak_bytes = self._proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


@dataclass
class CompressedModel:
    model: nn.Module
    manifest: Manifest

    offload: Any = None  # joules.compress.offload.Offload when compressed layer by layer

    def save(self, directory: str | Path, tokenizer: Any = None) -> Path:
        return save_compressed(self.model, self.manifest, directory, tokenizer, self.offload)


def _versions() -> dict[str, str]:
    """What the compressed weights depend on beside the recipe (every field of every step is in
    ``recipe_steps``) and the calibration: library versions, the joules code fingerprint
    (``joules_code``) and the compute identity (``compute``), as keys hash them."""
    return {**library_versions(), "compute": compute_label()}


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every parameter and persistent buffer, counted once; dense parameter count)."""
    seen: set[int] = set()
    n_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()  # layer by layer, blocks are meta tensors
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        n_bytes += t.numel() * t.element_size()
    n_params = 0
    seen.clear()
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            n_params += m.in_features * m.out_features + (
                m.out_features if m.bias is not None else 0
            )
            continue
        for p in m.parameters(recurse=False):
            key = id(p) if p.is_meta else p.data_ptr()
            if key not in seen:
                seen.add(key)
                n_params += p.numel()
    return n_bytes, n_params


def _finish_manifest(model: nn.Module, manifest: Manifest) -> None:
    manifest.modules = {}
    for n, m in model.named_modules():
        if getattr(m, "module_type", None) is None:
            continue
        if any(n.startswith(p + ".") for p in manifest.modules):
            continue  # rebuilt by its parent's from_config (act_quant, sparse parts)
        manifest.modules[n] = {"type": m.module_type, "config": m.export_config()}
    bits = sum(
        float(e["bits_per_weight"]) * _numel(e["shape"])
        for e in manifest.layers.values()
        if "shape" in e
    )
    numel = sum(_numel(e["shape"]) for e in manifest.layers.values() if "shape" in e)
    manifest.targeted_parameters = numel
    manifest.bits_per_weight = bits / numel if numel else None
    manifest.model_bytes, manifest.model_parameters = model_bytes(model)
    manifest.model_bits_per_weight = (
        8 * manifest.model_bytes / manifest.model_parameters if manifest.model_parameters else None
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def compress(
    model: nn.Module,
    recipe: str | Path | Recipe,
    calibration: torch.Tensor | None = None,
    tokenizer: Any = None,
    *,
    calibration_info: dict[str, Any] | None = None,
    source: str = "",
    prequantized: str | None = None,
    progress: ProgressFn | None = None,
    offload: Any = None,
) -> CompressedModel:
    """Apply ``recipe``'s steps to ``model`` in order (in place) and return it with a manifest.

    ``offload``: the :class:`~joules.compress.offload.Offload` of a model from
    :func:`~joules.compress.offload.load_layered`: the steps then read one decoder block at a
    time (each must be ``layered``) and the save streams block files into shards.
    """
    recipe = parse_recipe(recipe)
    if offload is not None:
        whole = [s.name for s in recipe.steps if not s.layered]
        if whole:
            layered = sorted(name for name in step_names() if step_class(name).layered)
            raise ConfigError(
                f"step '{whole[0]}' needs the whole model in memory: layer-by-layer compression "
                f"runs {', '.join(layered)} (compress in memory, or drop '{whole[0]}')"
            )
    if recipe.needs_calibration and calibration is None:
        names = [s.name for s in recipe.steps if s.needs_calibration]
        raise ConfigError(
            f"step '{names[0]}' needs calibration data: pass calibration=calibration_tokens(tok)"
        )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if calibration is not None and max_pos and calibration.shape[-1] > max_pos:
        raise ConfigError(
            f"calibration sequences of {calibration.shape[-1]} tokens exceed the model's context "
            f"({max_pos}): use --calib-len {max_pos} or less"
        )
    manifest = Manifest(
        recipe=recipe.to_string(),
        recipe_steps=[s.to_dict() for s in recipe.steps],
        source_model=source,
        prequantized=prequantized,
        synthetic=synthetic_label(getattr(model, "config", None)),
        versions=_versions(),
        calibration=calibration_info if recipe.needs_calibration else None,
    )
    ctx = CompressContext(model, tokenizer, calibration, manifest, progress, offload=offload)
    for step in recipe.steps:
        t0 = time.perf_counter()
        # calibration forwards through already-compressed layers take fp32 activations, never a
        # speed probe's choice: the compressed weights must not depend on timing
        with PeakRSS() as mem, pinned_activations("fp32"):
            step.apply(ctx)
        manifest.steps.append(
            {
                "name": step.name,
                "time_s": time.perf_counter() - t0,
                "peak_rss_bytes": mem.peak_bytes,
            }
        )
    if offload is not None:
        manifest.notes.append(
            "compressed layer by layer: one decoder block in memory at a time "
            f"({len(offload.layers)} blocks)"
        )
    _finish_manifest(model, manifest)
    return CompressedModel(model, manifest, offload)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def save_compressed(
    model: nn.Module,
    manifest: Manifest,
    directory: str | Path,
    tokenizer: Any = None,
    offload: Any = None,
) -> Path:
    """Write a compressed directory: safetensors + config + tokenizer, then ``joules.json``.

    In memory the weights are one ``model.safetensors``; layer by layer (``offload``) one shard
    per decoder block (its block file, moved) plus one for the rest, with
    ``model.safetensors.index.json``, as Hugging Face shards a checkpoint.

    Everything is written into a staging directory beside ``directory`` that is renamed into
    place at the end (:func:`~joules.serialize.atomic_directory`), and the manifest is written
    last with the size of every other file: a save killed at any point leaves the previous
    directory (or none), never a half one that loads. An existing ``directory`` is replaced
    only when it is empty or a joules compressed directory, so no other files are deleted.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    if out.is_dir() and not is_compressed_dir(out) and any(out.iterdir()):
        raise ConfigError(
            f"'{out}' exists and is not a joules compressed directory (no {MANIFEST_FILE}): "
            "saving there would replace its files; pick a new or empty output directory"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' exists and is not a directory: pick another output")
    _finish_manifest(model, manifest)
    config = model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, CompressedLinear) and getattr(config, "tie_word_embeddings", False):
        # The head is no longer the embedding: never re-tie it at load.
        config.tie_word_embeddings = False
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    shared: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        key = (id(v) if v.is_meta else v.data_ptr(), v.numel(), v.dtype)
        if v.numel() and hash(key) in seen:
            shared[k] = seen[hash(key)]
            continue
        seen[hash(key)] = k
        if offload is None:
            state[k] = v.detach().contiguous().cpu()
    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        if offload is None:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "joules": "1"})
        else:
            weight_map = offload.write_shards(tmp, shared)
            atomic_write_json(
                tmp / INDEX_FILE, {"metadata": {"joules": "1"}, "weight_map": weight_map}
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for hook in SAVE_HOOKS.values():
            hook(model, tmp)
        data = manifest.to_dict()
        data["shared_tensors"] = shared
        data[FILES_KEY] = _file_sizes(tmp)
        atomic_write_json(tmp / MANIFEST_FILE, data, default=str)
    return out


def _file_sizes(directory: Path) -> dict[str, int]:
    """Bytes of every file under ``directory`` but the manifest, by relative POSIX path."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def _check_complete(path: Path, raw: dict[str, Any]) -> None:
    """Refuse a directory whose files differ from what its manifest says was written."""
    files = raw.get(FILES_KEY)
    if files is None:  # written before joules recorded its files: the weights' header decides
        return
    wrong = [
        name
        for name, size_bytes in files.items()
        if not (path / name).is_file() or (path / name).stat().st_size != size_bytes
    ]
    if wrong:
        raise UnsupportedModelError(
            f"'{path}' is incomplete: {', '.join(wrong[:3])} missing or not the size its "
            f"{MANIFEST_FILE} records (an interrupted copy?): re-run `joules compress` to write it"
        )


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | Path) -> Manifest:
    p = Path(path) / MANIFEST_FILE
    if not p.is_file():
        raise UnsupportedModelError(
            f"'{path}' has no {MANIFEST_FILE}: not a complete joules compressed directory "
            "(an interrupted save writes its manifest last): re-run `joules compress`"
        )
    try:
        return Manifest.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UnsupportedModelError(f"'{p}' is not a valid joules manifest: {exc}") from exc


def _skeleton(path: Path, *, meta: bool = False) -> tuple[nn.Module, Manifest, dict[str, Any]]:
    """The model of compressed directory ``path`` with no weights read: (model, manifest, the
    manifest's raw JSON). Dense parameters live on the meta device; compressed modules are
    rebuilt from the manifest, their tensors empty (``meta``: on the meta device too)."""
    import warnings

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(path)
    raw = json.loads((path / MANIFEST_FILE).read_text())
    _check_complete(path, raw)
    unknown = sorted(set(manifest.runtime) - set(RUNTIME_HOOKS.names()))
    if unknown:
        # A runtime setting nobody re-applies would leave the model running without it (a KV
        # policy, say) while its figures claim it: refuse instead.
        raise UnsupportedModelError(
            f"'{path}' asks for runtime settings {unknown} that this joules cannot install "
            f"(known: {RUNTIME_HOOKS.names(sort=True)}): load it with the joules version that wrote it"
        )
    config = AutoConfig.from_pretrained(path)
    # The skeleton's parameters live on the meta device: materialising (and randomly
    # initialising) the dense model only to overwrite it would put a full-precision copy of
    # every weight in this process's peak memory, which a bench of the compressed model would
    # then report as its own. Buffers (rotary tables) are built for real, as transformers does.
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    with torch.device("meta") if meta else contextlib.nullcontext():
        for name, entry in manifest.modules.items():
            cls = module_class(entry["type"])
            replace_module(model, name, cls.from_config(entry["config"]))
    return model, manifest, raw


def _wanted_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype each skeleton tensor would have had: tensors load in it, as a copy into a
    materialised model would have converted them."""
    return {k: t.dtype for k, t in [*model.named_buffers(), *model.named_parameters()]}


def load_compressed(
    directory: str | Path, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any, Manifest]:
    """Rebuild a compressed model from its directory: ``(model, tokenizer, manifest)``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(directory)
    model, manifest, raw = _skeleton(path)
    shards = _weight_files(path)
    want = _wanted_dtypes(model)
    state: dict[str, torch.Tensor] = {}
    for f in shards:
        state.update(load_file(str(f)))
    for k, src in raw.get("shared_tensors", {}).items():
        state[k] = state[src]
    for k, t in state.items():
        if k in want and t.dtype != want[k]:
            state[k] = t.to(want[k])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"'{path}' does not match its manifest: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}: re-run `joules compress` to write it again"
        )
    model.tie_weights()  # assign=True replaced the tied parameter objects: tie them again
    still_meta = [k for k, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UnsupportedModelError(
            f"'{path}' has no weights for {still_meta[:3]}: re-run `joules compress` to write it again"
        )
    if dtype is not None:
        for m in model.modules():
            if isinstance(m, CompressedLinear):
                m.weight_dtype = dtype
        model.to(dtype)
    for key, cfg in manifest.runtime.items():
        RUNTIME_HOOKS.get(key)(model, cfg)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, manifest


class CompressedWeights:
    """The tensors of a compressed directory, read one at a time from its safetensors files.

        >>> cw = open_compressed("out/")                                   # doctest: +SKIP
        >>> with cw.resident("model.layers.0.mlp.down_proj") as lin:       # doctest: +SKIP
        ...     blocks = lin.qtensor().parts["blocks"]
        >>> emb = cw.rows("model.embed_tokens.weight", 0, 4096)            # doctest: +SKIP

    ``model`` is the skeleton :func:`load_compressed` would fill, on the meta device. Each read
    opens the file, copies what was asked and closes it, so nothing stays resident but what the
    caller holds (a memory map left open would keep every page it touched in this process's
    RSS). Tensors come in the dtype :func:`load_compressed` gives them, shared ones through the
    manifest's ``shared_tensors``.
    """

    def __init__(self, path: Path, model: nn.Module, manifest: Manifest, raw: dict[str, Any]):
        self.path = path
        self.model = model
        self.manifest = manifest
        self.where = safetensors_weight_map(path)
        self.shared: dict[str, str] = dict(raw.get("shared_tensors", {}))
        self.want = _wanted_dtypes(model)
        needed = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
        missing = [k for k in needed if self._stored(k) not in self.where and not _tied(model, k)]
        if not self.where:
            _weight_files(path)  # the one-line error for a directory without weights
        if missing:
            raise UnsupportedModelError(
                f"'{path}' does not match its manifest: missing {missing[:3]}: re-run "
                "`joules compress` to write it again"
            )

    def _stored(self, key: str) -> str:
        return self.shared.get(key, key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (its first dimension), an owned copy."""
        from safetensors import safe_open

        name = self._stored(key)
        with safe_open(str(self.where[name]), framework="pt") as f:
            t = f.get_slice(name)[start:stop]
        want = self.want.get(key)
        return t.to(want) if want is not None and t.dtype != want else t.clone()

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` whole, an owned copy."""
        from safetensors import safe_open

        name = self._stored(key)
        with safe_open(str(self.where[name]), framework="pt") as f:
            t = f.get_tensor(name)
        want = self.want.get(key)
        return t.to(want) if want is not None and t.dtype != want else t.clone()

    @contextlib.contextmanager
    def resident(self, name: str) -> Iterator[nn.Module]:
        """Submodule ``name`` with its tensors read in; back on the meta device on exit."""
        module = self.model.get_submodule(name)
        prefix = f"{name}." if name else ""
        keys = [k for k, v in module.state_dict(keep_vars=True).items() if v.is_meta]
        state = {k: self.get(prefix + k) for k in keys}
        module.load_state_dict(state, strict=False, assign=True)
        try:
            yield module
        finally:
            del state
            to_meta(list(module.modules()))


def open_compressed(directory: str | Path) -> tuple[CompressedWeights, Any]:
    """Compressed directory ``directory`` with nothing read: its :class:`CompressedWeights` and
    tokenizer (as :func:`load_compressed` returns it)."""
    from transformers import AutoTokenizer

    path = Path(directory)
    model, manifest, raw = _skeleton(path, meta=True)
    model.tie_weights()
    model.eval()
    weights = CompressedWeights(path, model, manifest, raw)
    return weights, AutoTokenizer.from_pretrained(path)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of compressed directory ``path``: ``model.safetensors``, or the
    shards its ``model.safetensors.index.json`` names (a layer-by-layer save)."""
    files = sorted(set(safetensors_weight_map(path).values()))
    if files:
        return files
    raise UnsupportedModelError(
        f"'{path}' has a joules.json but no {WEIGHTS_FILE} or {INDEX_FILE}: re-run "
        f"`joules compress ... -o {path}`"
    )


def _load_for_models(
    path: Path, dtype: torch.dtype | None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """:func:`joules.models.load_model`'s loader for a compressed directory (see below)."""
    model, tokenizer, manifest = load_compressed(path, dtype)
    return model, tokenizer, manifest.summary()


# models sits below compress and cannot import it: it loads a compressed directory through this
# hook (registered whenever joules.compress is imported).
register_loader("joules", _load_for_models)


def _tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return key in keys
