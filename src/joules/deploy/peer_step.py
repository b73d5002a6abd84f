"""``llamacpp(ftype, imatrix)``: llama.cpp's own quantizer as a recipe step, the peer of a sweep.

    >>> from joules.compress import parse_recipe
    >>> import joules.deploy  # registers the step
    >>> parse_recipe("llamacpp(ftype=Q4_K_M)").to_string()
    'llamacpp(ftype=Q4_K_M)'

What ``llama-imatrix`` then ``llama-quantize --imatrix`` make of the model as loaded, without
building them: the importance matrix comes from the sweep's calibration tokens
(:func:`joules.deploy.imatrix.compute_imatrix`, as llama-imatrix computes it over the same
chunks), the file from :func:`joules.deploy.peer.llamacpp_peer` (llama.cpp's
``llama_model_quantize`` with that matrix, byte for byte the source-built tool's file). The
file is what ships: the manifest's ``gguf_file`` names it, and a sweep on the llamacpp runtime
evaluates and benches that very file. For the torch runtimes the model's weights become the
file's, dequantized (``emulated``: torch runs them as floats).

It must be the only step (it quantizes the model as loaded, from its F32 export) and the model
must have been loaded from a spec (``compress(source=...)``, as the sweep and ``joules compress``
do). Files are cached under ``$JOULES_CACHE_DIR/peers`` by model content, preset and imatrix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from joules.compress.context import CompressContext
from joules.compress.recipe import Step, register_step
from joules.deploy.gguf_export import gguf_name
from joules.deploy.imatrix import Imatrix, compute_imatrix
from joules.deploy.peer import NEEDS_IMATRIX, PRESETS, base_f32_gguf, llamacpp_peer
from joules.errors import ConfigError
from joules.fingerprint import cache_key
from joules.models import load_model
from joules.models.loading import model_identity
from joules.paths import cache_dir


def imatrix_digest(im: Imatrix) -> str:
    """sha256 of what the quantizer receives (every entry's name and values)."""
    h = hashlib.sha256()
    for name in im.names():
        h.update(name.encode() + b"\0")
        h.update(im.values(name).astype("<f4").tobytes())
    return h.hexdigest()


def _bits_of(ggml_type: str) -> float | None:
    """Bits per weight of a GGML type (block bytes × 8 / block size), from gguf's table."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    except KeyError:
        return None
    return 8.0 * nbytes / block


@register_step("llamacpp")
@dataclass(kw_only=True)
class LlamaCppPeer(Step):
    """llama.cpp's quantizer: preset ``ftype`` (Q4_0, Q4_K_M, IQ4_NL...), with the importance
    matrix of the calibration tokens when ``imatrix`` (llama.cpp users quantize with one)."""

    ftype: str
    imatrix: bool = True

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.imatrix

    def validate(self) -> None:
        key = self.ftype.upper()
        if key not in PRESETS:
            raise ConfigError(f"llamacpp(ftype={self.ftype}): use one of {', '.join(PRESETS)}")
        if key in NEEDS_IMATRIX and not self.imatrix:
            raise ConfigError(f"llamacpp(ftype={key}): llama.cpp needs imatrix=true for it")
        if self.targets:
            raise ConfigError(
                "llamacpp(...) quantizes the whole model as llama.cpp does: no targets"
            )

    def apply(self, ctx: object) -> None:
        assert isinstance(ctx, CompressContext)
        manifest = ctx.manifest
        if manifest.steps or len(manifest.recipe_steps) != 1:
            raise ConfigError("llamacpp(...) must be the only step of its recipe")
        source = manifest.source_model
        if not source:
            raise ConfigError(
                "llamacpp(...) quantizes the model's F32 export: load the model from a spec "
                "(joules compress MODEL, or compress(..., source=spec))"
            )
        key = self.ftype.upper()
        im = None
        if self.imatrix:
            if ctx.calibration is None:
                raise ConfigError("llamacpp(imatrix=true) needs calibration tokens")
            im = compute_imatrix(ctx.model, ctx.calibration)
        f32 = base_f32_gguf(source)
        ident = model_identity(source)["sha256"]
        file_key = cache_key([ident, key, imatrix_digest(im) if im is not None else None])
        out = cache_dir() / "peers" / f"{Path(f32).stem.split('-f32-')[0]}-{key}-{file_key}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        peer = llamacpp_peer(f32, key, out, imatrix=im, imatrix_file="joules-calibration.gguf")
        # the torch model runs the file's weights (dequantized by transformers' GGUF reader)
        peer_model, _, _ = load_model(peer.path)
        state = peer_model.state_dict()
        with torch.no_grad():
            missing = ctx.model.load_state_dict(state, strict=False)
        if missing.missing_keys:
            raise ConfigError(
                f"llamacpp(...): the file has no weights for {missing.missing_keys[:3]} of the model"
            )
        for name, module in ctx.model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            g = gguf_name(f"{name}.weight")
            t = peer.types.get(g) if g else None
            bits = _bits_of(t) if t else None
            if t is None or bits is None:
                continue
            manifest.record(
                name,
                format=f"gguf-{t.lower()}",
                shape=list(module.weight.shape),
                bits_per_weight=bits,
                path="emulated",
                method="llamacpp",
            )
        manifest.gguf_file = {**peer.to_dict(), "imatrix_chunks": int(ctx.calibration.shape[0])
                              if im is not None and ctx.calibration is not None else 0}  # fmt: skip
        manifest.notes.append(
            f"llama.cpp {key} file{' with an importance matrix' if im is not None else ''}: "
            "torch runs its weights dequantized (emulated); the file is what ships"
        )
