"""A GGUF file of a target size: the byte budget left for the tensors joules chooses types for.

    >>> from joules.deploy.size import parse_size
    >>> parse_size("80MB"), parse_size("86.5MiB"), parse_size("1.2GB")
    (80000000, 90701824, 1200000000)

``joules compress MODEL --target-size 80MB`` runs ``gguf_mix(bytes=N)``
(:mod:`joules.compress.steps.gguf_mix`), where N is :func:`size_plan`'s budget: the target less
everything in the file the mix does not choose -- the GGUF header, metadata and tokenizer
(measured on the model's F32 export, not estimated), the tensor index, the norms and biases (F32),
an untied output head in ``output`` (Q6_K, as ``llama-quantize``'s presets store it), and up to 31
bytes of alignment padding per tensor and 4 KiB for the export's longer name and recipe strings.
The export then holds exactly the mix's bytes plus those,
so ``joules export`` of the result is at most the target.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from joules import formats
from joules.compress.steps.gguf_mix import GGUF_CANDIDATES
from joules.deploy.gguf_export import check_gguf_file
from joules.deploy.peer import base_f32_gguf
from joules.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS["GIB"] = 2**30
ALIGNMENT = 32  # GGUF's default tensor data alignment
# the compressed export's own strings (general.name: its directory; joules.export: its recipe
# and type counts) are longer than the F32 export's: room for them
METADATA_SLACK = 4096


def parse_size(text: str) -> int:
    """Bytes of ``80MB`` (10**6), ``86.5MiB`` (2**20), ``1.2GB`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r}: write a number with a unit, e.g. 80MB or 86.5MiB")
    n = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if n < 1:
        raise ConfigError(f"size {text!r}: give a positive size")
    return int(n)


@dataclass(frozen=True)
class SizePlan:
    """The budget of a target file size: ``budget_bytes`` for the mix's tensors (decoder-block
    linears and the token embedding), ``fixed_bytes`` for the rest (header, metadata, index,
    norms, untied head, alignment slack)."""

    target_bytes: int
    fixed_bytes: int
    budget_bytes: int
    smallest_bytes: int  # the smallest file: every mixed tensor in its cheapest candidate
    output: str | None  # the untied head's GGUF type (None: tied)
    source_f32: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_plan(
    model: str | os.PathLike[str], target_bytes: int, *, output: str = "gguf-q6_k"
) -> SizePlan:
    """What a ``target_bytes`` GGUF of ``model`` leaves for ``gguf_mix`` (see the module doc)."""
    f32 = base_f32_gguf(model)
    # (name, bytes, shape as rows x cols) of every tensor, from one read of the file
    tensors = [
        (t.name, int(t.n_bytes), tuple(int(d) for d in reversed(t.shape)))
        for t in check_gguf_file(f32).tensors
    ]
    fixed = f32.stat().st_size - sum(nb for _, nb, _ in tensors)  # header, metadata, index
    fixed += ALIGNMENT * len(tensors)  # a quantized tensor may need up to 31 bytes of padding
    fixed += METADATA_SLACK
    head = None
    cheapest = 0
    for name, nbytes, shape in tensors:
        if name == "token_embd.weight" or (name.startswith("blk.") and len(shape) >= 2):
            # the mix's: linears inside the blocks and the embedding
            cheapest += min(
                formats.get(c).for_shape(shape).total_bits(shape) // 8 for c in GGUF_CANDIDATES
            )
            continue
        if name == "output.weight":
            head = formats.get(output).for_shape(shape)
            fixed += head.total_bits(shape) // 8
        else:
            fixed += nbytes  # norms and biases stay F32
    smallest = fixed + cheapest
    if target_bytes < smallest:
        raise ConfigError(
            f"target size {target_bytes:,} bytes: the smallest GGUF file joules can write for "
            f"this model is {smallest:,} bytes ({smallest / 1e6:.1f} MB: every linear and the "
            "embedding in its smallest type, plus metadata, norms and head): give at least that"
        )
    return SizePlan(
        target_bytes, fixed, target_bytes - fixed, smallest, head.spec if head else None, str(f32)
    )
