"""The Format base class, packed QuantizedTensor, spec-string parsing and the format registry.

    >>> import torch
    >>> from joules import formats
    >>> fmt = formats.get("int4-g128")
    >>> x = torch.randn(256, 512)
    >>> q = fmt.quantize(x)
    >>> q.nbytes, fmt.bits_per_element((256, 512))        # codes + fp16 scales
    (67584, 4.125)
    >>> torch.equal(fmt.dequantize(q), fmt.fake_quant(x))
    True

A *spec* is a dash-separated string: a head naming the family and element (``int4``,
``uint4``, ``fp8``, ``mxfp4``, ``nxfp4``, ``nf4``, ``ternary``, ``codebook3``) followed by
option tokens (``asym``, ``e4m3``, ``ch``, ``g32``, ``raw``, ``s16``/``s32``/``sbf16``, ``nm2``,
``am``, ``cr``...). Each family parses its spec into a frozen ``@dataclass`` config whose
``spec`` property gives the canonical string back, so ``get(get(s).spec)`` is the same format.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from joules import dtypes
from joules.errors import ConfigError
from joules.registry import Registry

# --------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------

SCALE_DTYPES: dict[str, torch.dtype] = dtypes.choices("fp16", "bf16", "fp32")
SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}


def store_scale(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Round fp32 scales to their storage dtype, clamping finite values into its range.

    Non-finite scales (a group holding NaN or Inf) are stored as NaN: such a group decodes
    to NaN, as an E8M0 NaN scale does in OCP MX.
    """
    dt = SCALE_DTYPES[scale_dtype]
    if dt != torch.float32:
        s = s.clamp(max=torch.finfo(dt).max)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
    return s.to(dt)


def safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s, with s == 0 read as 1 (a zero scale means an all-zero group, or one below the
    scale dtype's range, whose elements then round to 0). Division, not a multiply by 1/s:
    1/s overflows for fp32-subnormal scales."""
    return x / safe_divisor(s)


def safe_divisor(s: torch.Tensor) -> torch.Tensor:
    """The divisor :func:`safe_div` uses: ``s`` with 0 read as 1 (fp32 scales stay fp32).
    Formats keep it as a derived parameter, so a fixed-parameter column divides in one op."""
    return torch.where(s == 0, torch.ones_like(s), s)


# --------------------------------------------------------------------------------------------
# Grouping: which elements share a scale
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """How elements share parameters: one group per tensor, per row (``ch``), or runs of
    ``size`` along the last dimension (``g{size}``; the last run of a row is padded by
    repeating the row's last element, which changes neither its max nor its min)."""

    kind: str = "tensor"  # "tensor" | "channel" | "group"
    size: int = 0

    @property
    def token(self) -> str:
        return {"tensor": "", "channel": "ch"}.get(self.kind, f"g{self.size}")

    def count(self, shape: tuple[int, ...]) -> int:
        """Number of groups (scales) for a tensor of ``shape``."""
        numel = math.prod(shape)
        if self.kind == "tensor" or numel == 0:
            return 1
        if self.kind == "channel":
            return shape[0] if len(shape) >= 1 else 1
        k = shape[-1] if shape else 1
        return (numel // max(k, 1)) * -(-k // self.size)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as ``[groups, n]`` (fp32), padding the last dim for ``g{size}``."""
        x = t.float()
        if self.kind == "tensor":
            return x.reshape(1, -1)
        if self.kind == "channel":
            return x.reshape(t.shape[0], -1) if t.dim() >= 1 else x.reshape(1, 1)
        k = t.shape[-1] if t.dim() else 1
        rows = x.reshape(-1, k)
        pad = (-k) % self.size
        if pad:
            rows = F.pad(rows.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
        return rows.reshape(-1, self.size)

    def merge(self, g: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`split`: drop the padding and restore ``shape``."""
        if self.kind != "group":
            return g.reshape(shape)
        k = shape[-1] if shape else 1
        kp = k + (-k) % self.size
        return g.reshape(-1, kp)[:, :k].reshape(shape)

    def pad_codes(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Flat per-element codes (unpadded, row-major) as ``[groups, n]`` padded with 0."""
        if self.kind == "tensor":
            return codes.reshape(1, -1)
        if self.kind == "channel":
            return codes.reshape(shape[0], -1) if shape else codes.reshape(1, 1)
        k = shape[-1] if shape else 1
        rows = codes.reshape(-1, k)
        pad = (-k) % self.size
        if pad:
            rows = F.pad(rows, (0, pad))
        return rows.reshape(-1, self.size)

    def strip_codes(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``[groups, n]`` codes back to flat unpadded row-major order."""
        if self.kind != "group":
            return codes.reshape(-1)
        k = shape[-1] if shape else 1
        kp = k + (-k) % self.size
        return codes.reshape(-1, kp)[:, :k].reshape(-1)


def parse_grouping(tok: str) -> Grouping | None:
    if tok == "ch":
        return Grouping("channel")
    m = re.fullmatch(r"g(\d+)", tok)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"group size must be >= 1 in '{tok}': use e.g. g32, g64, g128")
        return Grouping("group", n)
    return None


# --------------------------------------------------------------------------------------------
# QuantizedTensor
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedTensor:
    """A tensor in a number format, with real packed storage.

    ``parts`` holds the stored tensors (sub-byte codes packed into uint8, scales as
    fp16/bf16/fp32 or E8M0 bytes, zero-points, headers, codebooks); ``nbytes`` is what they
    occupy, which equals the format's bit cost rounded up to whole bytes per part.
    """

    spec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    def to(self, device: str | torch.device) -> QuantizedTensor:
        parts = {k: v.to(device) for k, v in self.parts.items()}
        return dataclasses.replace(self, parts=parts)

    def dequantize(self) -> torch.Tensor:
        return get(self.spec).dequantize(self)


# --------------------------------------------------------------------------------------------
# Configs and formats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatConfig:
    """Base of every format config: a frozen dataclass with a canonical ``spec``."""

    family: ClassVar[str] = ""

    @property
    def spec(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FormatConfig:
        cls = CONFIGS.get(d["family"])
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "grouping" and isinstance(v, dict):
                v = Grouping(**v)
            elif isinstance(v, builtins.list):
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class BlockModel:
    """Theoretical error of a block format for one tensor (see :mod:`joules.formats.error`).

    ``max_abs_error_bound``: guaranteed bound on |x - Q(x)| for every element that is not
    clipped; ``mse_model``: the uniform-noise model sum(step_i**2 / 12) / n of the format's
    local steps on this tensor.
    """

    max_abs_error_bound: float
    mse_model: float


class Format(ABC):
    """A number format: exact bit cost, quantize to packed storage, dequantize, fake_quant.

    All formats here are *emulated*: values are computed in fp32 with torch ops on whatever
    device the input lives on (CPU or CUDA), not by native low-precision hardware.
    """

    family: ClassVar[str] = ""
    emulated: ClassVar[bool] = True

    def __init__(self, config: FormatConfig, name: str | None = None):
        self.config = config
        self.spec = config.spec
        self.name = name or config.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # -- bit accounting ----------------------------------------------------------------------
    @abstractmethod
    def part_bits(self, shape: tuple[int, ...]) -> dict[str, int]:
        """Exact bit cost of each stored part for a tensor of ``shape``."""

    def total_bits(self, shape: tuple[int, ...]) -> int:
        return sum(self.part_bits(tuple(shape)).values())

    def bits_per_element(self, shape: tuple[int, ...] = (4096, 4096)) -> float:
        """Bits per element including scales, zero-points, headers and codebooks."""
        shape = tuple(shape)
        return self.total_bits(shape) / max(math.prod(shape), 1)

    def storage_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes ``quantize`` stores: each part's bits rounded up to a byte."""
        return sum((b + 7) // 8 for b in self.part_bits(tuple(shape)).values())

    # -- conversion ----------------------------------------------------------------------------
    @abstractmethod
    def quantize(self, t: torch.Tensor) -> QuantizedTensor:
        """Encode ``t`` into packed storage."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Decode to a tensor of the original shape and dtype."""

    @abstractmethod
    def fake_quant(self, t: torch.Tensor) -> torch.Tensor:
        """Round ``t`` to the format without packing: equal to ``dequantize(quantize(t))``."""

    # -- analysis ------------------------------------------------------------------------------
    def clip_mask(self, t: torch.Tensor) -> torch.Tensor:
        """True where an element lies outside its group's representable range."""
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)

    def error_model(self, t: torch.Tensor) -> BlockModel | None:
        """Theoretical error of this format on ``t`` (block formats only), else None."""
        return None

    @property
    def description(self) -> str:
        return self.spec

    def for_shape(self, shape: tuple[int, ...]) -> Format:
        """The format to use for a tensor of ``shape``: itself, except where a family has a
        per-tensor fallback (GGUF's K-quants on rows not a multiple of 256, as llama.cpp)."""
        return self

    # -- fixed-parameter quantization (GPTQ) ------------------------------------------------------
    def fit(self, w: torch.Tensor) -> Fitted:
        """Fix every data-dependent parameter (scales, minima, E8M0 exponents, NxFP per-block
        choices, codebooks...) from a 2-D weight ``w`` [rows, cols]; groups run along cols.
        The result rounds any columns with those parameters (see :class:`Fitted`)."""
        raise ConfigError(
            f"format '{self.spec}' has no fixed-parameter quantizer (fit): "
            "use a format of the int, minifloat, nf4, mx, nxfp, ternary or codebook family"
        )

    def _qt(self, t: torch.Tensor, parts: dict[str, torch.Tensor], **meta: Any) -> QuantizedTensor:
        return QuantizedTensor(self.spec, tuple(t.shape), t.dtype, parts, meta)


class Fitted(ABC):
    """A format with every data-dependent parameter fixed from one 2-D weight (``Format.fit``).

    ``fake_quant_cols(cols, col0)`` rounds columns ``col0 .. col0 + n - 1`` of a weight of
    ``shape`` with the fixed parameters of the groups they belong to (values outside a group's
    range clip as the format clips); ``quantize(w)`` packs a whole weight with them, so that
    ``dequantize(fitted.quantize(w))`` equals ``fitted.fake_quant_cols(w, 0)`` bit for bit and
    ``fmt.fit(w).quantize(w)`` is ``fmt.quantize(w)``. GPTQ rounds one column at a time with
    parameters fixed before its column pass (static groups), then packs what it rounded.

        >>> import torch
        >>> from joules import formats
        >>> w = torch.randn(8, 128)
        >>> f = formats.get("int4-g64").fit(w)
        >>> col = f.fake_quant_cols(w[:, 70:71] * 3, 70)   # clips to group 1's range
        >>> torch.equal(f.quantize(w).dequantize(), formats.get("int4-g64").fake_quant(w))
        True
    """

    def __init__(self, fmt: Format, shape: tuple[int, int]):
        self.format = fmt
        self.shape = shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.format.spec!r}, shape={self.shape})"

    @abstractmethod
    def fake_quant_cols(self, cols: torch.Tensor, col0: int) -> torch.Tensor:
        """Round ``cols`` [rows, n] (columns col0.. of the weight) with the fixed parameters:
        fp32 [rows, n]."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        """Pack a whole weight of ``shape`` with the fixed parameters (``Format.quantize``'s
        layout, so ``dequantize``/``nbytes`` are unchanged)."""

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """The whole weight rounded with the fixed parameters: ``fake_quant_cols(w, 0)``."""
        return self.fake_quant_cols(w, 0)

    def _check_cols(self, cols: torch.Tensor, col0: int) -> None:
        rows, k = self.shape
        if cols.dim() != 2 or cols.shape[0] != rows or not 0 <= col0 <= k - cols.shape[1]:
            raise ConfigError(
                f"{self.format.spec}: columns {tuple(cols.shape)} from column {col0} do not fit "
                f"the fitted weight {self.shape}: pass [rows, n] columns with col0 + n <= {k}"
            )

    def _check_weight(self, w: torch.Tensor) -> None:
        check_input(w, self.format.spec)
        if tuple(w.shape) != self.shape:
            raise ConfigError(
                f"{self.format.spec}: parameters were fitted on a {self.shape} weight, got "
                f"{tuple(w.shape)}: fit the format on this weight first"
            )


def check_fit_input(w: torch.Tensor, spec: str) -> None:
    """``fit`` takes a 2-D floating-point weight [rows, cols]."""
    check_input(w, spec)
    if w.dim() != 2:
        raise ConfigError(
            f"{spec}: fit needs a 2-D weight [rows, cols], got shape {tuple(w.shape)}: "
            "reshape it first, e.g. w.reshape(w.shape[0], -1)"
        )


def check_input(t: torch.Tensor, spec: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{spec}: expected a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point()):
        raise ConfigError(f"{spec}: expected a floating-point tensor, got {t.dtype}: cast it first")


def check_qt(q: QuantizedTensor, spec: str) -> None:
    if q.spec != spec:
        raise ConfigError(
            f"this tensor was quantized as '{q.spec}', not '{spec}': use formats.get('{q.spec}')"
        )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Parser = Callable[[re.Match[str], builtins.list[str]], FormatConfig]
_CACHE: dict[str, Format] = {}

# The presets `formats.list()` shows, in display order.
PRESETS: builtins.list[str] = []

# A spec's first token (``int4`` of ``int4-g64``) names its family: one pattern entry per family,
# whose parser reads the match and the remaining option tokens. Specs are a family each, so the
# unknown-spec error lists presets, not patterns.
FAMILIES: Registry[Parser] = Registry(
    "format", shown=lambda: [*PRESETS[:8], "..."], hint="see `joules formats list`"
)
CONFIGS: Registry[type[FormatConfig]] = Registry("format family", "format families")
FORMAT_CLASSES: Registry[type[Format]] = Registry("format family", "format families")


def register(
    head: str, config_cls: type[FormatConfig], presets: builtins.list[str]
) -> Callable[[Parser], Parser]:
    """Register a family: ``head`` is a regex for the first spec token."""

    def deco(parser: Parser) -> Parser:
        FAMILIES.register_pattern(re.compile(head), parser, label=config_cls.family)
        CONFIGS.register(config_cls.family, config_cls)
        PRESETS.extend(p for p in presets if p not in PRESETS)
        return parser

    return deco


def register_format(config_cls: type[FormatConfig]) -> Callable[[type[Format]], type[Format]]:
    def deco(fmt_cls: type[Format]) -> type[Format]:
        return FORMAT_CLASSES.register(config_cls.family, fmt_cls)

    return deco


def parse_spec(spec: str) -> FormatConfig:
    """Parse a spec string into its family's config, or raise :class:`ConfigError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            "empty format spec: pass e.g. 'int4-g128', 'mxfp4' (see `joules formats list`)"
        )
    tokens = spec.strip().lower().split("-")
    hit = FAMILIES.match(tokens[0])
    if hit is None:
        raise FAMILIES.unknown(spec)
    parser, m = hit
    return parser(m, tokens[1:])


def get(spec: str | FormatConfig) -> Format:
    """The format for a spec string (or config), e.g. ``get("mxfp4")``."""
    if isinstance(spec, FormatConfig):
        config, name = spec, spec.spec
    else:
        key = spec.strip().lower() if isinstance(spec, str) else spec
        if key in _CACHE:
            return _CACHE[key]
        config, name = parse_spec(spec), key
    fmt = FORMAT_CLASSES.get(config.family)(config, name=name)
    if isinstance(spec, str):
        _CACHE[name] = fmt
    return fmt


FAMILY_ORDER = ("int", "minifloat", "nf4", "mx", "nxfp", "ternary", "codebook", "gguf")


def list_formats() -> builtins.list[Format]:
    """Every preset format, in display order (by family, then as registered)."""
    fmts = [get(s) for s in PRESETS]
    return sorted(fmts, key=lambda f: FAMILY_ORDER.index(f.family))


class Options:
    """Helper for family parsers: consume option tokens, reject leftovers with a clear error."""

    def __init__(self, spec_head: str, tokens: builtins.list[str], allowed: str):
        self.head = spec_head
        self.tokens = builtins.list(tokens)
        self.allowed = allowed

    def take(self, pred: Callable[[str], Any]) -> Any:
        for i, tok in enumerate(self.tokens):
            r = pred(tok)
            if r is not None and r is not False:
                del self.tokens[i]
                return r
        return None

    def flag(self, name: str) -> bool:
        return bool(self.take(lambda t: t == name))

    def grouping(self, default: Grouping = Grouping()) -> Grouping:
        return self.take(parse_grouping) or default

    def scale_dtype(self, default: str) -> str:
        tok = self.take(lambda t: t if t in ("s16", "s32", "sbf16") else None)
        return {"s16": "fp16", "s32": "fp32", "sbf16": "bf16", None: default}[tok]

    def done(self) -> None:
        if self.tokens:
            raise ConfigError(
                f"unknown option '{self.tokens[0]}' in format '{self.head}-...': "
                f"allowed options are {self.allowed}"
            )


def default_scale_dtype(g: Grouping) -> str:
    """fp32 for one scale per tensor (its cost is nil), fp16 per channel or group (as GGUF)."""
    return "fp32" if g.kind == "tensor" else "fp16"


def scale_token(scale_dtype: str, g: Grouping) -> str:
    if scale_dtype == default_scale_dtype(g):
        return ""
    return {"fp16": "s16", "fp32": "s32", "bf16": "sbf16"}[scale_dtype]


def join_spec(*tokens: str) -> str:
    return "-".join(t for t in tokens if t)
