"""Export a joules-compressed directory as a compressed-tensors checkpoint (what vLLM serves).

    >>> from joules.deploy import export_compressed_tensors
    >>> res = export_compressed_tensors("q/", "ct/")                  # doctest: +SKIP
    >>> res.dtype, res.scheme_counts()                                # doctest: +SKIP
    ('float16', {'int4 sym group 64': 210})

The folder is a Hugging Face checkpoint (``config.json`` with a ``quantization_config``,
``model.safetensors``, tokenizer) in compressed-tensors' ``pack-quantized`` format, the one
llm-compressor writes for W4A16/W8A16 and vLLM's ``CompressedTensorsWNA16`` reads
(``vllm serve ct/``). Every linear layer in a format that maps is written as joules computed it,
never re-quantized: its codes packed eight (int4) or four (int8) to an int32 along the row
(``weight_packed`` [out, in * bits / 32]), its stored scales (``weight_scale`` [out, groups], in
their own fp16/bf16) and, for asymmetric formats, its integer zero points packed along the
column (``weight_zero_point`` [out * bits / 32, groups]); ``weight_shape`` is [out, in].
compressed-tensors decodes ``(q - z) * s`` in the scale dtype, which gives joules' dequantized
weight cast to that dtype bit for bit (``(q - z) * s`` is exact in fp32, so both round once).

What maps (:func:`ct_problem` says why a format does not): ``int4``/``int8`` (symmetric; joules'
restricted range ``[-7, 7]`` / ``[-127, 127]`` lies inside compressed-tensors' signed one) and
``uint4-asym``/``uint8-asym`` with ``zpint`` (an integer zero point, as compressed-tensors stores
it), per channel (``-ch``) or per group whose size divides the row (``-g64``...), with fp16 or
bf16 scales (vLLM holds scales in the model's dtype). GPTQ's activation order needs no
``g_idx``: joules' groups are static (fixed before the column pass), so the layout stays
contiguous. The checkpoint's dtype is the scales' dtype; the float tensors (embeddings, norms, a
dense head) are cast to it, exact only when they already were in it. Layers in other formats
are refused with the list of what maps, or written dense (dequantized, listed in ``ignore``) with
``dequantize=``. Quantized activations, sparse outlier parts and KV-cache policies are runtime
behaviour of joules' own modules that the checkpoint cannot carry: refused.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from joules import dtypes, formats
from joules.compress import read_manifest
from joules.compress.modules.linear import CompressedLinear, PrunedLinear
from joules.errors import ConfigError
from joules.formats.integer import IntConfig
from joules.formats.packing import unpack
from joules.models import load_model
from joules.models.loading import resolve
from joules.serialize import atomic_directory, atomic_write_json

CT_FORMAT = "pack-quantized"
# The compressed-tensors release whose layout this writes and whose loader the tests run; it
# goes into quantization_config["version"], where llm-compressor writes its installed version.
CT_VERSION = "0.20.1"
CT_BITS = (4, 8)  # what vLLM's W4A16/W8A16 kernels take (the format itself packs 1..8 bits)
CT_SCALE_DTYPES = ("fp16", "bf16")
DEQUANTIZE_TYPES = {"f16": "fp16", "bf16": "bf16"}
RECORD_FILE = "joules_export.json"  # what was written, layer by layer (marks the folder as ours)
WEIGHTS_FILE = "model.safetensors"
# vLLM fuses these projections into one layer, which takes one scheme
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def mapping_formats() -> str:
    """The joules formats that map, as one line (for refusals and docs)."""
    return (
        "int4/int8 (-ch or -g<N> with N dividing the row) and uint4-asym/uint8-asym with zpint, "
        "fp16 or bf16 scales, e.g. int4-g64, int4-ch, int8-ch, uint4-asym-g128-zpint"
    )


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors weight scheme (its ``QuantizationArgs``)."""

    bits: int
    symmetric: bool
    strategy: str  # "group" | "channel"
    group_size: int | None
    scale_dtype: str  # joules' short name of the scales' dtype (fp16, bf16)

    @property
    def label(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        where = f"group {self.group_size}" if self.strategy == "group" else "channel"
        return f"int{self.bits} {kind} {where}"

    def weights(self) -> dict[str, Any]:
        """The ``weights`` entry of a config group, as compressed-tensors serialises it."""
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "dynamic": False,
        }


def ct_scheme(spec: str, in_features: int) -> CTScheme | str:
    """The compressed-tensors scheme of a layer in joules format ``spec`` with rows of
    ``in_features``, or why it has none (one clause, for a refusal)."""
    cfg = formats.get(spec).config
    if not isinstance(cfg, IntConfig):
        return f"{spec} is not an integer format"
    if cfg.bits not in CT_BITS:
        return f"{spec} has {cfg.bits}-bit codes (vLLM takes 4 or 8)"
    if not cfg.symmetric and not cfg.int_zero_point:
        return f"{spec} stores a float minimum, not an integer zero point (use -zpint)"
    g = cfg.grouping
    if g.kind == "tensor":
        return f"{spec} has one scale per tensor (use -ch or -g<N>)"
    if g.kind == "group" and in_features % g.size:
        return f"{spec}'s groups of {g.size} do not divide rows of {in_features}"
    if cfg.scale_dtype not in CT_SCALE_DTYPES:
        return f"{spec} has {cfg.scale_dtype} scales (vLLM holds them in fp16 or bf16)"
    size = g.size if g.kind == "group" else None
    return CTScheme(cfg.bits, cfg.symmetric, g.kind, size, cfg.scale_dtype)


def ct_problem(spec: str, in_features: int) -> str | None:
    """Why a layer in ``spec`` cannot be written in compressed-tensors exactly, or None."""
    got = ct_scheme(spec, in_features)
    return got if isinstance(got, str) else None


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes [rows, cols] packed along the row into int32 words
    [rows, ceil(cols * bits / 32)]: code ``j`` in bits ``(j % (32 / bits)) * bits`` of word
    ``j // (32 / bits)``, as compressed-tensors' ``pack_to_int32`` stores its offset codes."""
    per = 32 // bits
    rows, cols = codes.shape
    x = F.pad(codes.to(torch.int64), (0, (-cols) % per)).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (x << shifts).sum(-1)  # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def ct_tensors(lin: CompressedLinear, scheme: CTScheme) -> dict[str, torch.Tensor]:
    """A compressed linear's weight as compressed-tensors ``pack-quantized`` tensors (local
    names: ``weight_packed``, ``weight_scale``, ``weight_shape``, ``weight_zero_point``).

    compressed-tensors packs ``q + 2**(bits-1)`` for a signed code ``q`` and decodes
    ``(q - z) * s``. Symmetric joules codes are stored as ``q + qmax`` (``qmax = 2**(bits-1) - 1``),
    so the packed value is the stored code + 1; an asymmetric joules code ``c`` with zero point
    ``z`` (both unsigned) decodes ``(c - z) * s``, written as ``c`` and ``z`` themselves."""
    qt = lin.qtensor()
    cfg = formats.get(qt.spec).config
    assert isinstance(cfg, IntConfig)
    out, inn = qt.shape
    groups = inn // scheme.group_size if scheme.group_size else 1
    codes = unpack(qt.parts["codes"].cpu(), cfg.bits, qt.numel).reshape(out, inn)
    if scheme.symmetric:
        codes = codes.to(torch.int16) + 1  # [1, 2**bits - 1]
    t = {
        "weight_packed": pack_int32(codes, cfg.bits),
        "weight_scale": qt.parts["scales"].cpu().reshape(out, groups).contiguous(),
        "weight_shape": torch.tensor([out, inn], dtype=torch.int64),
    }
    if not scheme.symmetric:
        zp = unpack(qt.parts["offsets"].cpu(), cfg.bits, out * groups).reshape(out, groups)
        t["weight_zero_point"] = pack_int32(zp.T, cfg.bits).T.contiguous()
    return t


@dataclass
class CTLayer:
    """One linear layer of the written checkpoint."""

    name: str
    source_format: str | None  # the joules format (None: a dense linear)
    scheme: str | None  # compressed-tensors scheme label; None when written dense
    exact: bool  # True: the checkpoint decodes to joules' weight (in the checkpoint's dtype)
    nbytes: int


@dataclass
class CTExportResult:
    """What :func:`export_compressed_tensors` wrote."""

    path: str
    source: str
    recipe: str | None
    dtype: str  # torch name of the checkpoint's dtype (its scales' dtype)
    format: str  # "pack-quantized", or "dense" when nothing is quantized
    layers: list[CTLayer] = field(default_factory=list)
    float_tensors: int = 0  # embeddings, norms, dense layers' weights and biases
    floats_exact: bool = True  # whether those were already in the checkpoint's dtype
    config_groups: dict[str, list[str]] = field(default_factory=dict)  # group -> targets
    ignore: list[str] = field(default_factory=list)
    file_nbytes: int = 0

    def scheme_counts(self) -> dict[str, int]:
        return dict(Counter(x.scheme or "dense" for x in self.layers))

    @property
    def exact(self) -> bool:
        return self.floats_exact and all(x.exact for x in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheme_counts"] = self.scheme_counts()
        d["exact"] = self.exact
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CTExportResult:
        d = {k: v for k, v in d.items() if k not in ("scheme_counts", "exact")}
        d["layers"] = [CTLayer(**x) for x in d.get("layers", [])]
        return CTExportResult(**d)


def _unwritable(model: nn.Module, manifest: Any) -> str | None:
    """Why the model's compression cannot live in a compressed-tensors checkpoint at all."""
    # (a mixed() family's runtime entry is fine: the installed member is what is written)
    if manifest is not None and "kv_cache" in manifest.runtime:
        return (
            "its KV-cache policy is a setting of joules' torch runtimes that the checkpoint "
            "cannot carry (vLLM has its own, e.g. --kv-cache-dtype): compress without it"
        )
    for name, mod in model.named_modules():
        mtype = getattr(mod, "module_type", None)
        if mtype is None or isinstance(mod, PrunedLinear):
            continue
        if mtype in ("act_quant", "act_quant_linear") or getattr(mod, "act_quant", None):
            return f"'{name}' quantizes its activations at run time, which it cannot write"
        if isinstance(mod, CompressedLinear) or mtype in ("sparse_outliers", "outlier_columns"):
            continue  # a sparse part makes its layer dense-only (--dequantize)
        return f"'{name}' is a joules {mtype} module, which it has no form for"
    return None


def _layer_scheme(lin: CompressedLinear) -> CTScheme | str:
    if lin.sparse is not None:
        return f"{lin.spec} plus a sparse outlier part"
    got = ct_scheme(lin.spec, lin.in_features)
    if isinstance(got, str):
        return got
    mask = lin.weight_mask
    if mask is not None and bool((lin.format.dequantize(lin.qtensor())[~mask] != 0).any()):
        return f"{lin.spec} with a pruning mask its codes do not hold"
    return got


def _check_fused(schemes: dict[str, CTScheme | None]) -> None:
    """vLLM serves q/k/v and gate/up as one fused layer each, which takes one scheme."""
    for name in schemes:
        stem, _, leaf = name.rpartition(".")
        for group in FUSED:
            if leaf != group[0]:
                continue
            members = {f"{stem}.{m}": schemes.get(f"{stem}.{m}") for m in group}
            if len(set(members.values())) > 1:
                got = ", ".join(
                    f"{n.rpartition('.')[2]}={x.label if x else 'dense'}"
                    for n, x in members.items()
                )
                raise ConfigError(
                    f"{stem}: vLLM fuses {'/'.join(group)} into one layer with one scheme, got "
                    f"{got}: compress them to one format"
                )


def _output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' exists and is not a directory: pick another output")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise ConfigError(
            f"'{out}' exists and is not a joules compressed-tensors export (no {RECORD_FILE}): "
            "writing there would replace its files; pick a new or empty output directory"
        )


def export_compressed_tensors(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dequantize: str | None = None,
) -> CTExportResult:
    """Write ``model`` (a compressed directory) as a compressed-tensors checkpoint folder at
    ``output``.

    ``dequantize`` (``"f16"`` | ``"bf16"``, the checkpoint's dtype): write layers whose format
    does not map as dense weights (listed in ``ignore``, recorded as not exact) instead of
    refusing them. Without a layer that maps, the checkpoint is dense in that dtype."""
    if dequantize is not None and dequantize not in DEQUANTIZE_TYPES:
        raise ConfigError(
            f"--dequantize {dequantize!r}: a compressed-tensors checkpoint holds floats as "
            f"{' or '.join(DEQUANTIZE_TYPES)}"
        )
    out = Path(output)
    _output_dir(out)
    kind, path = resolve(model)
    manifest = read_manifest(path) if kind == "joules" else None
    m, tokenizer, _ = load_model(model)
    why = _unwritable(m, manifest)
    if why is not None:
        raise ConfigError(f"compressed-tensors export: {why}")

    linears = {n: x for n, x in m.named_modules() if isinstance(x, CompressedLinear | nn.Linear)}
    got = {n: _layer_scheme(x) for n, x in linears.items() if isinstance(x, CompressedLinear)}
    refused = {n: g for n, g in got.items() if isinstance(g, str)}
    if refused and dequantize is None:
        first = next(iter(refused))
        raise ConfigError(
            f"{len(refused)} layers have no compressed-tensors form ({refused[first]}; e.g. "
            f"{first}): what maps is {mapping_formats()}; or pass --dequantize f16|bf16 to "
            "write them dense"
        )
    schemes = {n: g for n, g in got.items() if isinstance(g, CTScheme)}
    scale_dtypes = sorted({s.scale_dtype for s in schemes.values()})
    if len(scale_dtypes) > 1:
        raise ConfigError(
            f"the layers' scales are {' and '.join(scale_dtypes)}: a checkpoint has one dtype, "
            "compress with one scale dtype"
        )
    if scale_dtypes:
        dtype_short = scale_dtypes[0]
        if dequantize is not None and DEQUANTIZE_TYPES[dequantize] != dtype_short:
            flag = next(k for k, v in DEQUANTIZE_TYPES.items() if v == dtype_short)
            raise ConfigError(
                f"--dequantize {dequantize}: this checkpoint is {dtype_short} (its scales' "
                f"dtype); pass --dequantize {flag}"
            )
    elif dequantize is not None:
        dtype_short = DEQUANTIZE_TYPES[dequantize]
    else:
        raise ConfigError(
            f"'{model}' has no quantized layer: compress it first (joules compress MODEL "
            "--recipe 'gptq(format=int4-g64)' -o DIR), or pass --dequantize f16|bf16 for a "
            "dense checkpoint"
        )
    dt = dtypes.to_torch(dtype_short)
    _check_fused({n: schemes.get(n) for n in linears})

    # -- tensors ---------------------------------------------------------------------------------
    tied = bool(getattr(m.config, "tie_word_embeddings", False))
    state: dict[str, torch.Tensor] = {}
    layers: list[CTLayer] = []
    floats, floats_exact = 0, True

    def put_float(key: str, v: torch.Tensor) -> None:
        nonlocal floats, floats_exact
        floats += 1
        floats_exact = floats_exact and (not v.is_floating_point() or v.dtype == dt)
        state[key] = (v.to(dt) if v.is_floating_point() else v).detach().cpu().contiguous()

    for name, lin in linears.items():
        scheme = schemes.get(name)
        if scheme is not None:
            t = {f"{name}.{k}": v for k, v in ct_tensors(lin, scheme).items()}
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            layers.append(CTLayer(name, lin.spec, scheme.label, True, nbytes))
            state.update(t)
        elif isinstance(lin, CompressedLinear):  # --dequantize: joules' decode rounded to dt
            w = lin.dequantize_weight().detach().to(dt).cpu().contiguous()
            layers.append(CTLayer(name, lin.spec, None, False, w.numel() * w.element_size()))
            state[f"{name}.weight"] = w
        elif not (tied and name == "lm_head"):  # a tied head is read from the embedding
            w = lin.weight.detach()
            layers.append(CTLayer(name, None, None, w.dtype == dt, w.numel() * dt.itemsize))
            state[f"{name}.weight"] = w.to(dt).cpu().contiguous()
        if getattr(lin, "bias", None) is not None:
            put_float(f"{name}.bias", lin.bias)
    linear_prefixes = tuple(f"{n}." for n in linears)
    for k, v in m.state_dict().items():
        if not k.startswith(linear_prefixes):  # linears' own tensors (masks too) are done
            put_float(k, v)

    # -- config: one group per scheme; one scheme targets "Linear" as llm-compressor writes it --
    by_scheme: dict[CTScheme, str] = {}
    targets: dict[str, list[str]] = {}
    for n, s in schemes.items():
        g = by_scheme.setdefault(s, f"group_{len(by_scheme)}")
        targets.setdefault(g, []).append(n)
    if len(by_scheme) == 1:
        targets = {"group_0": ["Linear"]}
    dense = [n for n in linears if n not in schemes]  # the ignore list (a tied head included)
    config = copy.deepcopy(m.config)
    config.architectures = [type(m).__name__]
    config.dtype = dt
    if by_scheme:
        config.quantization_config = {
            "config_groups": {
                g: {
                    "targets": targets[g],
                    "weights": s.weights(),
                    "input_activations": None,
                    "output_activations": None,
                    "format": CT_FORMAT,
                }
                for s, g in by_scheme.items()
            },
            "format": CT_FORMAT,
            "global_compression_ratio": None,
            "ignore": dense,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        }
    result = CTExportResult(
        path=str(out),
        source=str(model),
        recipe=getattr(manifest, "recipe", None),
        dtype=dtypes.torch_name(dt),
        format=CT_FORMAT if by_scheme else "dense",
        layers=layers,
        float_tensors=floats,
        floats_exact=floats_exact,
        config_groups=targets,
        ignore=dense if by_scheme else [],
    )

    # -- write -----------------------------------------------------------------------------------
    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        generation = getattr(m, "generation_config", None)
        if generation is not None and m.can_generate():
            generation.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        result.file_nbytes = (tmp / WEIGHTS_FILE).stat().st_size
        atomic_write_json(tmp / RECORD_FILE, result.to_dict())
    return result


def read_record(path: str | os.PathLike[str]) -> CTExportResult:
    """The :class:`CTExportResult` an export wrote into its folder."""
    return CTExportResult.from_dict(json.loads((Path(path) / RECORD_FILE).read_text()))
