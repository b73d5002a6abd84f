"""Deployment: GGUF export of GGUF-exact formats (and the llama.cpp runtime, optional extra);
compressed-tensors export of int formats (what vLLM serves).

>>> from joules.deploy import export_gguf, export_compressed_tensors
>>> export_gguf("out/", "out.gguf").type_counts()                # doctest: +SKIP
{'Q4_0': 210, 'F32': 62}
>>> export_compressed_tensors("out/", "ct/").scheme_counts()     # doctest: +SKIP
{'int4 sym group 64': 210}
"""

from joules.deploy import (
    llamacpp_logits,  # noqa: F401  (registers the llamacpp logit runtime)
    peer_step,  # noqa: F401  (registers the llamacpp(ftype=...) step)
)
from joules.deploy.ct_export import CTExportResult, CTLayer, export_compressed_tensors
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
    "CTExportResult",
    "CTLayer",
    "ExportResult",
    "ExportedTensor",
    "check_gguf_file",
    "exact_gguf_specs",
    "export_compressed_tensors",
    "export_gguf",
    "permute_rows",
    "unpermute_rows",
]
