"""Random-weight checkpoints of real model shapes, for time and memory measurements only.

    >>> from joules.models.synthetic import shipped_configs, synthetic_config
    >>> sorted(shipped_configs())[:3]
    ['llama-2-7b', 'llama-3-8b', 'llama-3.2-1b']
    >>> synthetic_config("llama-3.2-1b")["vocab_size"]
    128256
    >>> write_synthetic("llama-3-8b", "l8b/")   # 16 GB of bf16 shards + tokenizer  # doctest: +SKIP

:func:`write_synthetic` writes a Hugging Face directory from a config shipped in
``joules/data/configs`` (or any ``config.json``): ``config.json``, bf16 safetensors shards of at
most ``shard_bytes`` with their ``model.safetensors.index.json``, and a byte-level tokenizer
whose vocabulary has exactly the config's ``vocab_size`` entries (so the embedding and the head
cost what the real model's do, and llama.cpp loads the GGUF export). Tensors are generated one
at a time in row chunks straight into the checkpoint dtype, so writing an 8B shape holds one
shard, never the model. Every ``load_model``, ``compress`` and ``export`` path runs on it.

The weights are random (normal, std ``initializer_range``; norms ones): **quality figures from
a synthetic checkpoint are meaningless**. ``config.json`` carries the marker
:data:`MARKER_KEY`, which a compressed copy keeps; :func:`synthetic_label` reads it and every
result built from such a model carries :data:`SYNTHETIC_LABEL`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from joules.errors import ConfigError
from joules.models.info import MARKER_KEY, SYNTHETIC_LABEL, synthetic_label
from joules.models.loading import SAFETENSORS_FILE, SAFETENSORS_INDEX
from joules.models.tiny import byte_tokenizer
from joules.serialize import atomic_directory, atomic_write_json

__all__ = ["MARKER_KEY", "SYNTHETIC_LABEL", "shipped_configs", "synthetic_label", "write_synthetic"]

_CHUNK_ELEMS = 1 << 24  # rows are generated in chunks of about this many fp32 values (64 MB)


def shipped_configs() -> dict[str, Path]:
    """The model shapes shipped in ``joules/data/configs``, by name (file stem)."""
    root = resources.files("joules.data").joinpath("configs")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def synthetic_config(config: str | Path, layers: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a synthetic checkpoint: a shipped shape by name or a JSON file,
    with the byte tokenizer's special ids and, if given, ``layers`` decoder blocks."""
    shipped = shipped_configs()
    path = shipped.get(str(config)) or Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no model shape '{config}': use a config.json path or one of "
            f"{', '.join(sorted(shipped))}"
        )
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if key not in cfg:
            raise ConfigError(f"'{path}' has no '{key}': not a causal LM config.json")
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"layers={layers}: a synthetic model needs at least one block")
        cfg["num_hidden_layers"] = layers
    if cfg["vocab_size"] < 259:
        raise ConfigError(f"vocab_size {cfg['vocab_size']} < 259: the byte tokenizer needs 259")
    # the byte tokenizer's ids (its vocabulary is padded to vocab_size below)
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.setdefault("torch_dtype", "bfloat16")
    cfg[MARKER_KEY] = {"shape": path.stem if path.name != "config.json" else path.parent.name}
    return cfg


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a checkpoint of ``cfg`` stores (tied ones once), with its shape and dtype,
    from the model class built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied head is the embedding: stored once
    persistent = set(model.state_dict())
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, p in model.named_parameters():  # tied parameters once (remove_duplicate)
        out[name] = (tuple(p.shape), p.dtype)
    for name, b in model.named_buffers():
        if name in persistent:
            out[name] = (tuple(b.shape), b.dtype)
    return out


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float
) -> torch.Tensor:
    """One tensor of a synthetic checkpoint: 1-D ``*norm*`` weights are ones, other tensors
    normal(0, ``std``), drawn in row chunks straight into ``dtype`` (the same values for a
    (seed, name) whatever the order tensors are written in)."""
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    g = _generator(seed, name)
    step = max(1, _CHUNK_ELEMS // max(1, flat.shape[1]))
    for r in range(0, flat.shape[0], step):
        rows = flat[r : r + step]
        rows.copy_(torch.randn(rows.shape, generator=g).mul_(std))
    return out


def write_synthetic(
    config: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    layers: int | None = None,
    shard_bytes: int = 1 << 30,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``config``'s shape into ``out``.

    Shards of at most ``shard_bytes`` (a larger single tensor gets a shard of its own), written
    into a staging directory renamed into place at the end. Returns ``out``.
    """
    from safetensors.torch import save_file

    cfg = synthetic_config(config, layers)
    cfg["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dtype, "float32"
    )
    cfg[MARKER_KEY]["seed"] = seed
    shapes = tensor_shapes(cfg)
    std = float(cfg.get("initializer_range", 0.02))
    shards: list[list[str]] = [[]]
    size = 0
    elem = torch.empty((), dtype=dtype).element_size()
    for name, (shape, _) in shapes.items():
        nbytes = elem * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (
        [SAFETENSORS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out = Path(out)
    with atomic_directory(out) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for names, fname in zip(shards, files, strict=True):
            state = {n: random_tensor(n, shapes[n][0], dtype, seed, std) for n in names}
            total += sum(t.numel() * t.element_size() for t in state.values())
            save_file(state, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
            del state
        if len(files) > 1:
            atomic_write_json(
                tmp / SAFETENSORS_INDEX,
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        atomic_write_json(tmp / "config.json", cfg)
        byte_tokenizer(int(cfg["vocab_size"])).save_pretrained(tmp)
    return out
