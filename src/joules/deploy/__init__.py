"""Deployment: GGUF export of GGUF-exact formats (and the llama.cpp runtime, optional extra).

>>> from joules.deploy import export_gguf
>>> export_gguf("out/", "out.gguf").type_counts()                # doctest: +SKIP
{'Q4_0': 210, 'F32': 62}
"""

from joules.deploy import (
    llamacpp_logits,  # noqa: F401  (registers the llamacpp logit runtime)
    peer_step,  # noqa: F401  (registers the llamacpp(ftype=...) step)
)
from joules.deploy.gguf_export import (
    ExportedTensor,
    ExportResult,
    check_gguf_file,
    exact_gguf_specs,
    export_gguf,
    permute_rows,
    unpermute_rows,
)

__all__ = [
    "ExportResult",
    "ExportedTensor",
    "check_gguf_file",
    "exact_gguf_specs",
    "export_gguf",
    "permute_rows",
    "unpermute_rows",
]
