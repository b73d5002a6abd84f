"""Evaluation: perplexity, multiple-choice accuracy, deviation from a reference, attention stability.

    >>> from joules.models import tiny_model
    >>> from joules.data import load_text
    >>> from joules.evaluate.perplexity import perplexity
    >>> model, tok, _ = tiny_model()
    >>> perplexity(model, tok, load_text("wikitext2", "test"), window=64, limit_tokens=128).windows
    2

Every result carries the protocol that produced it (``result.protocol``); see
``perplexity.py``, ``choice.py``, ``deviation.py`` and ``attention.py`` for each protocol.
"""

# compress registers the loader of compressed directories: a task that loads a model by spec
# (a deviation reference, lm-eval's model) can then load one (models sits below compress).
import joules.compress  # noqa: F401
from joules.evaluate.choice import choice_accuracy
from joules.evaluate.perplexity import perplexity, wikitext2_perplexity
from joules.evaluate.results import (
    ChoiceResult,
    DeviationResult,
    LayerSQNR,
    PerplexityResult,
    wilson_interval,
)

__all__ = [
    "ChoiceResult",
    "DeviationResult",
    "LayerSQNR",
    "PerplexityResult",
    "choice_accuracy",
    "perplexity",
    "wikitext2_perplexity",
    "wilson_interval",
]
