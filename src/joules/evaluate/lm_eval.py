"""Run lm-evaluation-harness tasks on any joules MODEL (extra ``joules[lmeval]``).

    >>> import joules.evaluate.lm_eval                      # registers the "joules" model  # doctest: +SKIP
    >>> from lm_eval import simple_evaluate                  # doctest: +SKIP
    >>> simple_evaluate(model="joules", model_args="model=smollm2-135m,dtype=bf16",
    ...                 tasks=["hellaswag"], limit=100)       # doctest: +SKIP

From the shell: ``lm_eval --model joules --model_args model=smollm2-135m --include_path DIR
--tasks NAME`` after ``import joules.evaluate.lm_eval`` (e.g. via ``python -c``), or pass an
already loaded model with ``JoulesLM.from_loaded(model, tokenizer)`` to ``simple_evaluate``.

``MODEL`` is anything :func:`joules.models.load_model` accepts (the embedded default, a Hugging
Face directory, a ``.gguf`` file), or a model joules compressed. Scoring goes through the same
:class:`~joules.evaluate.scoring.Scorer` as ``joules eval``, so ``loglikelihood`` here and
``joules eval --task hellaswag`` agree token for token; ``loglikelihood_rolling`` follows
lm-eval's own rolling-window rule (its ``get_rolling_token_windows``) with the tokenizer's BOS
or EOS as the prefix token.
"""

from __future__ import annotations

from typing import Any

import torch

from joules.errors import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        "joules.evaluate.lm_eval needs lm-evaluation-harness: pip install 'joules[lmeval]'"
    ) from exc

from joules import dtypes
from joules.data.tokens import encode
from joules.evaluate.choice import encode_pair
from joules.evaluate.scoring import Scorer
from joules.models import load_model

_DTYPES = dtypes.choices("fp32", "bf16", "fp16")


@register_model("joules")
class JoulesLM(LM):
    """An lm-eval ``LM`` backed by a joules model (greedy generation, exact log-likelihoods)."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "fp32",
        max_length: int | str = 2048,
        batch_size: int | str = 1,
        _loaded: tuple[Any, Any] | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if _loaded is not None:
            self.model, self.tokenizer = _loaded
        else:
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            self.model, self.tokenizer, _info = load_model(model, dtype=_DTYPES[dtype])
        self.spec = model
        self.max_length = int(max_length)
        self.scorer = Scorer(self.model)
        tok = self.tokenizer
        self.prefix_token_id = (
            tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
        )

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, max_length: int = 2048) -> JoulesLM:
        """Wrap a model already in memory (e.g. one joules compressed)."""
        return cls(model="<in memory>", max_length=max_length, _loaded=(model, tokenizer))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "joules")).replace("/", "__")

    # -- scoring --------------------------------------------------------------------------------
    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """log p(cont | ctx) and whether greedy decoding would produce ``cont``."""
        ids = (ctx + cont)[-(self.max_length + 1) :]  # keep the tail if too long, as lm-eval
        n_ctx = len(ids) - len(cont)
        x = torch.tensor([ids[:-1]], device=self.scorer.device)  # [1, T]
        with torch.inference_mode():
            hidden, _ = self.scorer.hidden(x, use_cache=False)
            rows = hidden[0, n_ctx - 1 :]  # [len(cont), D]
            logits = self.scorer.logits(rows)  # [len(cont), V] fp32
            logp = torch.log_softmax(logits, -1)
            target = torch.tensor(cont, device=logp.device)
            total = float(logp.gather(1, target[:, None]).double().sum())
            greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            if context:
                ctx, cont = encode_pair(self.tokenizer, context, continuation)
            else:
                ctx, cont = [], encode(self.tokenizer, continuation)
            if not ctx:
                ctx = [self.prefix_token_id]
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=encode(self.tokenizer, text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            ids = encode(self.tokenizer, context) or [self.prefix_token_id]
            ids = ids[-self.max_length :]
            x = torch.tensor([ids], device=self.scorer.device)
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            text = self.tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


__all__ = ["JoulesLM"]
