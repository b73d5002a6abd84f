"""How far a model's predictions deviate from a reference's on the same tokens (llama.cpp's KL stats).

    >>> import torch
    >>> from joules.models import tiny_model
    >>> from joules.data import load_text
    >>> from joules.evaluate.deviation import deviation, round_to, transformed_copy
    >>> ref, tok, _ = tiny_model()
    >>> test = transformed_copy(ref, round_to(torch.bfloat16))     # weights rounded to bf16
    >>> r = deviation(test, ref, tok, load_text("wikitext2"), window=64, limit_tokens=128)
    >>> r.kl_mean >= 0 and 0 <= r.top1_agreement <= 1
    True

The model under test is any model with the reference's vocabulary: a copy whose weights went
through a number format (:func:`transformed_copy` with :func:`format_transform`, i.e. the
formats module's emulated ``fake_quant``), a compressed model, or another checkpoint.

Per scored token (``scored="all"``: non-overlapping windows, scored as in ``perplexity.py``;
``"second-half"``: llama-perplexity's chunks, see :mod:`joules.evaluate.kld`):

* KL(reference ‖ model) of the next-token distributions, in nats: mean (with its standard error
  across windows and a 95 % Student t interval), median, 99th percentile and maximum (median
  and percentile interpolated as llama.cpp's);
* top-1 agreement: how often both put their highest probability on the same token;
* each model's NLL of the actual next token, hence the perplexity ratio model / reference, with
  its paired 95 % interval over windows (:func:`joules.evaluate.paired.paired_nll`).

Per module (``sqnr_modules="linear"``: every decoder ``nn.Linear``; ``"block"``: every decoder
layer),
forward hooks accumulate the output SQNR 10·log10(Σ ref² / Σ (model − ref)²) over all tokens,
to find the layers that hurt. The reference's outputs of one window are held in memory while the
model runs the same window (about 0.6 GB for SmolLM2 at window 1024 with ``linear``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from joules import dtypes
from joules.errors import ConfigError
from joules.evaluate.kld import KLSummary, TokenProtocol, plan_rows, protocol_ids
from joules.evaluate.results import DeviationProtocol, DeviationResult, LayerSQNR
from joules.evaluate.scoring import Scorer

WeightTransform = Callable[[torch.Tensor], torch.Tensor]  # weight [out, in] -> same shape


def round_to(dtype: torch.dtype) -> WeightTransform:
    """A transform that rounds weights to ``dtype`` and back (e.g. bf16 round-to-nearest-even)."""

    def transform(w: torch.Tensor) -> torch.Tensor:
        return w.to(dtype).to(w.dtype)

    transform.__name__ = f"round-{dtypes.torch_name(dtype)}"
    return transform


def format_transform(spec: str) -> WeightTransform:
    """The formats module's emulated ``fake_quant`` for ``spec`` (e.g. ``mxfp4``, ``int4-g128``)."""
    try:
        from joules import formats
    except ImportError as exc:
        raise ConfigError(
            f"--weights-format {spec} needs joules.formats, which this install does not have: "
            "use a joules version with the formats module, or pass --reference instead"
        ) from exc
    fmt = formats.get(spec)  # raises its own ConfigError for an unknown spec
    fake_quant = fmt.fake_quant

    def transform(w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w.float()).to(w.dtype)

    transform.__name__ = f"{getattr(fmt, 'name', spec)} (emulated fake_quant)"
    return transform


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder's ``nn.Linear`` modules: what weight formats apply to (not embeddings/head)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
    ]


def transformed_copy(
    model: nn.Module,
    transform: WeightTransform,
    select: Callable[[nn.Module], list[tuple[str, nn.Linear]]] = quantizable_linears,
) -> nn.Module:
    """A deep copy of ``model`` whose selected linear weights went through ``transform``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for _, lin in select(out):
            new = transform(lin.weight.data)
            if new.shape != lin.weight.shape:
                raise ConfigError(
                    f"weight transform changed a weight's shape {tuple(lin.weight.shape)} -> "
                    f"{tuple(new.shape)}: it must return a tensor of the same shape"
                )
            lin.weight.data = new.to(lin.weight.dtype)
    return out


def kl_rows(lp_ref: torch.Tensor, lp_test: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) per row of log-probabilities ``[N, V]`` -> ``[N]``, in nats.

    ``sum_v p_ref · (log p_ref − log p_test)`` with xlogy's convention ``0 · log 0 = 0``: a token
    the reference gives probability 0 (log-prob −inf, e.g. a masked vocabulary entry) adds 0, even
    where the model's log-prob is −inf too (the plain product is ``0 · nan = nan`` there). Not
    ``torch.special.xlogy(p, p / q)``: ``q = exp(log q)`` underflows to 0 far from the reference's
    support and would turn a finite term infinite; the terms are masked and multiplied instead.
    """
    p_ref = lp_ref.exp()
    terms = torch.where(p_ref > 0, p_ref * (lp_ref - lp_test), torch.zeros_like(p_ref))
    return terms.sum(-1).clamp_min(0)


class _SQNRHooks:
    """Forward hooks that store the reference's module outputs, then compare the model's."""

    def __init__(self, model: nn.Module, reference: nn.Module, kind: str) -> None:
        self.phase = "ref"
        self.stored: dict[str, torch.Tensor] = {}
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.handles: list[Any] = []
        ref_mods = dict(_modules(reference, kind))
        test_mods = dict(_modules(model, kind))
        self.names = [n for n in ref_mods if n in test_mods]
        seen: set[int] = set()
        for n in self.names:
            for m in (ref_mods[n], test_mods[n]):
                if id(m) not in seen:
                    seen.add(id(m))
                    self.handles.append(m.register_forward_hook(self._hook(n)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor):
                return
            if self.phase == "ref":
                self.stored[name] = out.detach().float()
                return
            ref = self.stored.pop(name, None)
            if ref is None or ref.shape != out.shape:
                return
            err = out.detach().float() - ref
            self.signal[name] = self.signal.get(name, 0.0) + float(ref.double().pow(2).sum())
            self.noise[name] = self.noise.get(name, 0.0) + float(err.double().pow(2).sum())

        return hook

    def results(self) -> list[LayerSQNR]:
        out = []
        for n in self.names:
            s, e = self.signal.get(n, 0.0), self.noise.get(n, 0.0)
            if s == 0 and e == 0:
                db = math.nan  # never compared
            elif e == 0:
                db = math.inf  # identical outputs
            else:
                db = 10 * math.log10(s / e) if s > 0 else -math.inf
            out.append(LayerSQNR(n, db))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.stored.clear()


def _modules(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    if kind == "linear":
        # The output head is left out: its output is the logits, which the KL statistics cover
        # (and the scorer calls it outside the hooks' ref/test phases).
        return quantizable_linears(model)
    if kind == "block":
        return [
            (n, m) for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")
        ]
    return []


def deviation(
    model: Any,
    reference: Any,
    tokenizer: Any,
    text: str | list[int],
    *,
    window: int = 1024,
    limit_tokens: int | None = None,
    add_bos: bool | None = None,
    sqnr_modules: str = "linear",
    scored: str = "all",
    dataset: str = "<text>",
    model_name: str | None = None,
    reference_name: str | None = None,
    transform_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DeviationResult:
    """KL / top-1 / perplexity-ratio statistics of ``model`` against ``reference`` on ``text``.

    Both torch models run side by side on each row (exact float32 distributions, and the module
    SQNR hooks); ``scored`` picks the rows (:class:`joules.evaluate.kld.TokenProtocol`). For a
    reference computed once and stored, or another runtime, see :mod:`joules.evaluate.kld`.
    """
    if sqnr_modules not in {"linear", "block", "none"}:
        raise ConfigError(f"sqnr_modules must be linear, block or none, got {sqnr_modules!r}")
    tokens = TokenProtocol(window, scored, add_bos, limit_tokens, dataset)
    ids, tokens, bos_id = protocol_ids(tokenizer, text, tokens)
    rows = plan_rows(ids, window, scored, bool(tokens.add_bos), bos_id)
    total = sum(r.scored for r in rows)
    s_test, s_ref = Scorer(model), Scorer(reference)
    hooks = _SQNRHooks(model, reference, sqnr_modules)
    kls: list[torch.Tensor] = []
    w_kl: list[float] = []
    w_nll: list[float] = []
    w_ref: list[float] = []
    counts: list[int] = []
    agree = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for row in rows:
                x = torch.tensor([row.tokens], device=s_ref.device)  # [1, T]
                lo = row.score_from  # first scored position
                hooks.phase = "ref"
                h_ref, _ = s_ref.hidden(x, use_cache=False)
                hooks.phase = "test"
                h_test, _ = s_test.hidden(x.to(s_test.device), use_cache=False)
                rows_ref = h_ref[0, lo - 1 : -1]  # [n, D]: predicts tokens lo..T-1
                rows_test = h_test[0, lo - 1 : -1].to(rows_ref.device)
                targets = x[0, lo:]
                window_kl = []
                nll_test = nll_ref = 0.0
                for lp_ref, lp_test, tgt in zip(
                    s_ref.logprob_chunks(rows_ref),
                    s_test.logprob_chunks(rows_test),
                    targets.split(512),
                    strict=True,
                ):
                    if lp_ref.shape != lp_test.shape:
                        raise ConfigError(
                            f"the model's vocabulary ({lp_test.shape[-1]}) differs from the "
                            f"reference's ({lp_ref.shape[-1]}): compare models of one tokenizer"
                        )
                    kl = kl_rows(lp_ref, lp_test)
                    window_kl.append(kl.double())
                    agree += int((lp_ref.argmax(-1) == lp_test.argmax(-1)).sum())
                    nll_ref -= float(lp_ref.gather(1, tgt[:, None]).double().sum())
                    nll_test -= float(lp_test.gather(1, tgt[:, None]).double().sum())
                wk = torch.cat(window_kl)
                kls.append(wk)
                w_kl.append(float(wk.sum()))
                w_nll.append(nll_test)
                w_ref.append(nll_ref)
                counts.append(wk.numel())
                if progress:
                    progress(sum(counts), total)
    finally:
        hooks.remove()
    all_kl = torch.cat(kls).numpy()
    n = all_kl.size
    protocol = DeviationProtocol(
        model=model_name or "model",
        reference=reference_name or "reference",
        transform=transform_name,
        dataset=dataset,
        window=window,
        limit_tokens=limit_tokens,
        add_bos=bool(tokens.add_bos),
        sqnr_modules=sqnr_modules,
        activation_dtype=s_test.activations(),
        compute_path=s_test.compute_path(),
        reference_compute_path=s_ref.compute_path(),
        scored=scored,
        stream_tokens=len(ids),
    )
    return DeviationResult(
        protocol=protocol,
        tokens_scored=n,
        top1_agreement=agree / n,
        nll_model=sum(w_nll) / n,
        nll_reference=sum(w_ref) / n,
        layers=hooks.results(),
        duration_s=time.perf_counter() - t0,
        window_tokens=counts,
        window_kl_sums=w_kl,
        window_nll_sums=w_nll,
        window_nll_reference_sums=w_ref,
        **KLSummary.of(all_kl, w_kl, counts, w_nll, w_ref).fields(),
    )
