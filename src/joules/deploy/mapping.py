"""Which recipes have a deployable GGUF file, decided from the recipe alone (before any run).

    >>> from joules.deploy.mapping import recipe_gguf_problem
    >>> recipe_gguf_problem("gptq(format=gguf-q4_0)") is None
    True
    >>> recipe_gguf_problem("rtn(format=int4-g64)")
    'its weights are int4-g64, which no GGUF type holds: use a format that maps (gguf-q8_0, gguf-q4_0, gguf-q4_1, gguf-q5_0, gguf-q5_1, gguf-q2_k, gguf-q3_k, gguf-q4_k, gguf-q5_k, gguf-q6_k, gguf-mxfp4, gguf-tq1_0, gguf-tq2_0, gguf-iq4_nl, gguf-iq4_xs, mxfp4) or llamacpp(ftype=...)'

A sweep whose ``[eval]`` or ``[bench]`` runtime runs files (llamacpp) refuses, at spec time, a
recipe this finds no file for, with the reason. The export (:func:`joules.deploy.export_gguf`)
stays the final judge: it writes the stored block bytes of GGUF-exact formats and refuses the
rest. Steps that only rescale weights (``smoothquant``; ``awq``'s scales are folded into the
weights and the norms before them) keep a recipe exportable; steps whose result GGUF cannot hold
(a sparse outlier part, a pruning mask the runtime applies, quantized activations, merged
heads, a KV-cache policy) do not. ``llamacpp(ftype=...)`` (llama.cpp's own quantizer, the peer)
is its own file.
"""

from __future__ import annotations

from joules.compress.recipe import parse_recipe
from joules.deploy.gguf_export import FLOAT_TYPES, exact_gguf_specs
from joules.errors import ConfigError

# Steps whose output a GGUF file holds when their weight format maps: each rounds or rescales
# dense weights (their `format` field is the stored format).
QUANTIZING_STEPS = ("rtn", "gptq", "awq", "gguf_mix")  # gguf_mix: its `candidates` are formats
RESCALING_STEPS = ("smoothquant",)  # folds scales into weights and norms: still dense floats
PEER_STEP = "llamacpp"
_WHY_NOT = {
    "prune": "its pruning mask is applied by joules' runtime and a sparse part has no GGUF form",
    "outliers": "its sparse outlier part has no GGUF form",
    "actquant": "it quantizes activations at run time, which llama.cpp does not do",
    "kvcache": "a KV-cache policy is a runtime setting of joules' torch runtimes",
    "heads": "merged attention heads change the model's shape llama.cpp reads",
    "mixed": "its per-layer formats (int4-g*/int5/int6/int8) have no GGUF types",
}


def _maps() -> str:
    return ", ".join(exact_gguf_specs())


def recipe_gguf_problem(recipe: str) -> str | None:
    """Why ``recipe`` cannot be written as a GGUF file joules' export makes exactly, or None."""
    try:
        steps = parse_recipe(recipe).steps
    except ConfigError as exc:
        return str(exc)
    names = [s.name for s in steps]
    if PEER_STEP in names:
        return None if names == [PEER_STEP] else f"{PEER_STEP}(...) must be the only step"
    exact = set(exact_gguf_specs())
    for s in steps:
        if s.name in QUANTIZING_STEPS or s.name in RESCALING_STEPS:
            continue
        why = _WHY_NOT.get(s.name, "joules has no GGUF form for its result")
        return f"step {s.name!r}: {why}"
    quantizing = [s for s in steps if s.name in QUANTIZING_STEPS]
    if not quantizing:
        return None  # dense weights: written as floats
    last = quantizing[-1]
    formats = list(getattr(last, "candidates", ())) or [last.format]
    for o in getattr(last, "overrides", ()):
        formats.append(o.split("=", 1)[1].strip())
    for f in formats:
        if f not in exact:
            return (
                f"its weights are {f}, which no GGUF type holds: use a format that maps "
                f"({_maps()}) or {PEER_STEP}(ftype=...)"
            )
    return None


def embedding_problem(spec: str) -> str | None:
    """Why ``spec`` cannot store a token embedding in a GGUF file, or None."""
    if spec in FLOAT_TYPES or spec in exact_gguf_specs():
        return None
    return f"{spec!r} is not a GGUF type joules writes ({', '.join([*FLOAT_TYPES, *exact_gguf_specs()])})"
