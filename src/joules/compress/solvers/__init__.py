"""The numerical solvers the steps share: :mod:`~joules.compress.solvers.hessian` (Hessian
accumulation, GPTQ's column-by-column rounding, OBS pruning),
:mod:`~joules.compress.solvers.knapsack` (the bits budget for mixed precision) and
:mod:`~joules.compress.solvers.plan` (fitting a weight to a format, with outlier columns split
off). They import the compressed modules, never a step.
"""
