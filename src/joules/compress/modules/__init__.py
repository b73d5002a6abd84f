"""What a compressed model is made of: :mod:`~joules.compress.modules.linear` (``CompressedLinear``
and the registry of module types a manifest names, so a saved directory rebuilds its structure)
and :mod:`~joules.compress.modules.kernels` (the one kernel registry, by format and device).
They import nothing else from ``compress``: the core, the solvers and the steps build on them.
"""
