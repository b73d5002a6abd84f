"""``mixed(avg_bits, candidates, sensitivity=fisher)``: one format per layer under a bit budget.

    >>> from joules.models import tiny_model
    >>> from joules.compress import compress, calibration_tokens
    >>> model, tok, _ = tiny_model()
    >>> calib, _ = calibration_tokens(tok, n=4, length=32)
    >>> cm = compress(model, "mixed(avg_bits=[4, 5], candidates=[int3-g32, int4-g32, int8-g32])",
    ...               calibration=calib)
    >>> fam = cm.manifest.runtime["mixed_family"]
    >>> [m["avg_bits"] for m in fam["members"]], cm.manifest.bits_per_weight <= 4
    ([4.0, 5.0], True)

Every targeted linear is quantized once per candidate format (``quantizer=rtn``, or
``gptq`` with Hessians of the *unquantized* model's inputs -- an approximation: sequential GPTQ
would depend on which member the earlier blocks took); each option's error is weighted by a
sensitivity: ``fisher`` (default) ``sum F * D^2`` with ``D = W - Q`` and ``F`` the empirical
Fisher diagonal (squared gradients of each calibration sequence's loss), ``hessian``
``tr(D H D^T)`` with ``H`` the layer's input Hessian (the layer's output error on calibration
tokens, blind to how much that output matters to the loss), or ``probe`` the calibration loss
increase when only that layer is quantized (slow: layers x candidates forward passes). The choice
minimises the summed error with the targeted linears' average bits/weight (scales included) at
most ``avg_bits`` (:mod:`joules.compress.solvers.knapsack`: exact, or stated approximate, then no
affordable single-layer upgrade left).

A list of budgets yields a FlexQuant-like *family* in one pass: calibration, sensitivities and
every candidate's packed weight are shared; the model holds the member of the first budget
listed, the manifest (``runtime["mixed_family"]``) lists every member's choice, bits and error and
the layers and bytes each move between neighbours rewrites, and ``family.safetensors`` (saved
beside the model) holds each layer's packed weight for every format some member uses, so
:func:`switch_member` rewrites only the layers that differ.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from joules import formats
from joules.compress.api import read_manifest, register_runtime_hook, register_save_hook
from joules.compress.context import (
    BlockInputs,
    CompressContext,
    dense_weight,
    install_quantized,
    replace_module,
)
from joules.compress.modules.linear import CompressedLinear, compressed_linears
from joules.compress.recipe import Step, register_step
from joules.compress.solvers.hessian import gptq_quantize
from joules.compress.solvers.knapsack import solve
from joules.compress.steps.gptq import hessians
from joules.compress.steps.outliers import fisher_diagonals
from joules.compress.steps.rtn import check_format
from joules.errors import ConfigError
from joules.formats.base import QuantizedTensor

FAMILY_FILE = "family.safetensors"
FAMILY_KEY = "mixed_family"


@dataclass
class _Layer:
    name: str
    module: nn.Module
    qts: list[QuantizedTensor]
    costs: list[int]  # total bits per candidate
    errors: list[float]


@register_step("mixed")
@dataclass(kw_only=True)
class Mixed(Step):
    """Choose a candidate format per targeted linear under an average bits/weight budget."""

    avg_bits: tuple[float, ...]
    # int4 at three group sizes lets a layer give up a little (g128) so another gets more; int3
    # is left out by default: on SmolLM2-135M every additive sensitivity tried underrates it,
    # and a member with int3 layers lost to uniform int4-g64 at the same bits (README)
    candidates: tuple[str, ...] = (
        "int4-g128",
        "int4-g64",
        "int4-g32",
        "int5-g128",
        "int5-g64",
        "int6-g64",
        "int8-g64",
    )
    # fisher: measured closer to the perplexity than hessian's output error (README)
    sensitivity: Literal["hessian", "fisher", "probe"] = "fisher"
    quantizer: Literal["rtn", "gptq"] = "rtn"

    needs_calibration = True
    # sensitivity=hessian reads one decoder block at a time; fisher (a backward pass through
    # the whole model) and probe (whole-model forwards per candidate) are refused layer by layer
    layered = True

    def validate(self) -> None:
        if not self.avg_bits:
            raise ConfigError("mixed needs avg_bits, e.g. mixed(avg_bits=4.5) or [3.5, 4, 4.5]")
        if len(self.candidates) < 2:
            raise ConfigError(
                "mixed needs at least two candidates, e.g. candidates=[int4-g128, int4-g64, int8-ch]"
            )
        for c in self.candidates:
            check_format(c, "mixed")
        least = min(formats.get(c).bits_per_element((4096, 4096)) for c in self.candidates)
        for b in self.avg_bits:
            if b < least - 1e-9:
                raise ConfigError(
                    f"mixed avg_bits={b:g} is below the smallest candidate's {least:g} bits/weight: "
                    f"use avg_bits >= {least:g}, or list candidates that include a smaller format "
                    "(candidates= replaces the defaults), e.g. candidates=[int3-g64, int4-g64, "
                    "int5-g64, int8-g64]"
                )

    # -- candidates and their errors -----------------------------------------------------------
    def _candidates(self, w: torch.Tensor, h: torch.Tensor | None) -> list[QuantizedTensor]:
        out = []
        for spec in self.candidates:
            fmt = formats.get(spec).for_shape(tuple(w.shape))  # GGUF's per-tensor fallback
            if self.quantizer == "gptq":
                assert h is not None
                fitted = fmt.fit(w)
                out.append(fitted.quantize(gptq_quantize(w, h, fitted.fake_quant_cols)))
            else:
                out.append(fmt.quantize(w))
        return out

    def _layer(
        self, name: str, m: nn.Module, h: torch.Tensor | None, f: torch.Tensor | None
    ) -> _Layer:
        w = dense_weight(m)
        qts = self._candidates(w, h)
        shape = (int(w.shape[0]), int(w.shape[1]))
        costs = [formats.get(q.spec).total_bits(shape) for q in qts]
        errors = []
        for q in qts:
            d = q.dequantize().float() - w
            if self.sensitivity == "hessian":
                assert h is not None
                errors.append(float(((d @ h) * d).sum()))
            elif self.sensitivity == "fisher":
                assert f is not None
                errors.append(float((f * d.pow(2)).sum()))
            else:
                errors.append(0.0)  # probe: filled in later
        return _Layer(name, m, qts, costs, errors)

    def _collect(self, ctx: CompressContext, targets: dict[str, nn.Module]) -> list[_Layer]:
        layers: dict[str, _Layer] = {}
        fisher = fisher_diagonals(ctx, targets) if self.sensitivity == "fisher" else {}
        if self.sensitivity == "hessian" or self.quantizer == "gptq":
            by_block = ctx.by_block(
                targets, "mixed targets decoder-block linears only, not '{name}'"
            )

            def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
                mods = by_block[i]
                for rel, h in hessians(inputs, block, mods).items():
                    name = f"{block_name}.{rel}"
                    layers[name] = self._layer(name, mods[rel], h.matrix(), fisher.get(name))

            ctx.sequential(fn, step="mixed", blocks=set(by_block))
        else:
            for name, m in targets.items():
                layers[name] = self._layer(name, m, None, fisher.get(name))
        out = [layers[n] for n in targets]
        if self.sensitivity == "probe":
            self._probe(ctx, out)
        return out

    def _probe(self, ctx: CompressContext, layers: list[_Layer]) -> None:
        ids = ctx.require_calibration("mixed")[: ctx.batch_size]

        def loss() -> float:
            with torch.no_grad():
                return float(ctx.model(input_ids=ids, labels=ids, use_cache=False).loss)

        base = loss()
        for lay in layers:
            keep = lay.module.weight.data.clone()
            for k, q in enumerate(lay.qts):
                lay.module.weight.data.copy_(q.dequantize().to(keep.dtype))
                lay.errors[k] = max(loss() - base, 0.0)
            lay.module.weight.data.copy_(keep)

    # -- apply -------------------------------------------------------------------------------------
    def apply(self, ctx: CompressContext) -> None:
        if ctx.offload is not None and self.sensitivity != "hessian":
            need = (
                "a backward pass through the whole model (the gradient of every weight)"
                if self.sensitivity == "fisher"
                else "forwards of the whole model for every candidate of every layer"
            )
            raise ConfigError(
                f"mixed(sensitivity={self.sensitivity}) needs {need}, which layer-by-layer "
                "compression never holds in memory (joules compresses layer by layer when the "
                "checkpoint exceeds a quarter of the free memory): use sensitivity=hessian, or "
                "--in-memory on a machine with room for the model and its gradients"
            )
        targets = ctx.resolve_targets(self.targets)
        for name, m in targets.items():
            if isinstance(m, CompressedLinear) or getattr(m, "weight_plan", None) is not None:
                raise ConfigError(
                    f"mixed: '{name}' is already quantized or carries a weight plan (outliers, "
                    "outlier channels): mixed chooses plain formats for dense linears"
                )
        layers = self._collect(ctx, targets)
        numel = sum(lay.module.in_features * lay.module.out_features for lay in layers)
        members = []
        for b in self.avg_bits:
            budget = int(b * numel)
            cheapest = sum(min(lay.costs) for lay in layers)
            if budget < cheapest:
                raise ConfigError(
                    f"mixed avg_bits={b:g} is below the cheapest choice for these layers "
                    f"({cheapest / numel:.4g} bits/weight with their shapes): raise it to that"
                )
            sol = solve([lay.costs for lay in layers], [lay.errors for lay in layers], budget)
            members.append(
                {
                    "avg_bits": float(b),
                    "bits_per_weight": sol.cost / numel,
                    "error": sol.error,
                    "exact": sol.exact,
                    "cost_unit_bits": sol.unit,
                    "choice": {
                        lay.name: self.candidates[k]
                        for lay, k in zip(layers, sol.choice, strict=True)
                    },
                }
            )
        first = members[0]["choice"]
        by_name = {lay.name: lay for lay in layers}
        # layer by layer, each block is read back (in block order) while its layers are installed
        for name, module in ctx.each_target({lay.name: lay.module for lay in layers}):
            lay = by_name[name]
            install_quantized(
                ctx, name, module, lay.qts[self.candidates.index(first[name])], "mixed"
            )
        # The family store: each layer's packed weight in every format some member uses.
        store: dict[str, dict[str, QuantizedTensor]] = {}
        for lay in layers:
            used = {mem["choice"][lay.name] for mem in members}
            store[lay.name] = {
                s: q for s, q in zip(self.candidates, lay.qts, strict=True) if s in used
            }
        ctx.model._joules_family = store  # written by the save hook below
        order = sorted(range(len(members)), key=lambda i: members[i]["avg_bits"])
        moves = []
        for a, b in itertools.pairwise(order):
            for src, dst in ((a, b), (b, a)):
                moves.append(_move(members[src], members[dst], store))
        ctx.manifest.runtime[FAMILY_KEY] = {
            "candidates": list(self.candidates),
            "sensitivity": self.sensitivity,
            "quantizer": self.quantizer,
            "installed": members[0]["avg_bits"],
            "members": members,
            "moves": moves,
            "options": {lay.name: {"costs": lay.costs, "errors": lay.errors} for lay in layers},
            "store": FAMILY_FILE,
            "store_bytes": sum(q.nbytes for d in store.values() for q in d.values()),
        }


def _move(
    a: dict[str, Any], b: dict[str, Any], store: dict[str, dict[str, QuantizedTensor]]
) -> dict[str, Any]:
    changed = [n for n in a["choice"] if a["choice"][n] != b["choice"][n]]
    return {
        "from": a["avg_bits"],
        "to": b["avg_bits"],
        "layers": len(changed),
        "bytes": sum(store[n][b["choice"][n]].nbytes for n in changed),
    }


# ----------------------------------------------------------------------------------------------
# Saving the family and moving between members
# ----------------------------------------------------------------------------------------------


@register_save_hook
def _save_family(model: nn.Module, directory: Path) -> None:
    store = getattr(model, "_joules_family", None)
    if not store:
        return
    from safetensors.torch import save_file

    tensors = {
        f"{layer}|{spec}|{part}": t.detach().contiguous().cpu()
        for layer, d in store.items()
        for spec, q in d.items()
        for part, t in q.parts.items()
    }
    meta = {f"{layer}|{spec}": q.meta for layer, d in store.items() for spec, q in d.items()}
    save_file(tensors, str(directory / FAMILY_FILE), metadata={"meta": json.dumps(meta)})


@register_runtime_hook(FAMILY_KEY)
def _family_at_load(model: nn.Module, cfg: dict[str, Any]) -> None:
    model._joules_family_info = cfg  # switch_member reads the rest from the directory


def switch_member(model: nn.Module, directory: str | Path, avg_bits: float) -> dict[str, Any]:
    """Move a loaded family model to the member of ``avg_bits``, rewriting only differing layers.

    Returns ``{"layers": n, "bytes": b}``: how many layers were rewritten and the packed bytes
    read from ``family.safetensors`` for them.
    """
    from safetensors import safe_open

    directory = Path(directory)
    fam = read_manifest(directory).runtime.get(FAMILY_KEY)
    if not fam:
        raise ConfigError(
            f"'{directory}' holds no mixed family: compress with mixed(avg_bits=[...])"
        )
    members = {float(m["avg_bits"]): m for m in fam["members"]}
    if float(avg_bits) not in members:
        raise ConfigError(
            f"the family has no member at avg_bits={avg_bits:g}: members are "
            f"{', '.join(f'{b:g}' for b in sorted(members))}"
        )
    want = members[float(avg_bits)]["choice"]
    lins = compressed_linears(model)
    changed = [n for n, spec in want.items() if lins[n].spec != spec]
    nbytes = 0
    with safe_open(str(directory / FAMILY_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        for n in changed:
            spec = want[n]
            prefix = f"{n}|{spec}|"
            keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open)
            parts = {k[len(prefix) :]: f.get_tensor(k) for k in keys}
            old = lins[n]
            qt = QuantizedTensor(
                spec,
                (old.out_features, old.in_features),
                old.weight_dtype,
                parts,
                meta[f"{n}|{spec}"],
            )
            nbytes += qt.nbytes
            new = CompressedLinear.from_linear(_LinearView(old), qt)
            new.act_quant = old.act_quant
            replace_module(model, n, new)
    return {"layers": len(changed), "bytes": nbytes}


class _LinearView(nn.Module):
    """What ``CompressedLinear.from_linear`` reads of a linear: shape, dtype, device, bias."""

    def __init__(self, lin: CompressedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = torch.empty(lin.out_features, lin.in_features, dtype=lin.weight_dtype)
        self.bias = lin.bias
