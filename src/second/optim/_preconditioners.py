"""Shared machinery of the preconditioned first-order optimizers (SOAP, Shampoo, Sophia, AdaHessian).

The names live in three modules, re-exported here:

* :mod:`second.optim._preconditioned`: the transactional ``torch.optim.Optimizer`` shell
  (:class:`PreconditionedOptimizer`) and its checks;
* :mod:`second.optim._gradient_factors`: the Kronecker factors of a gradient and the shell of
  SOAP and Shampoo (:class:`KroneckerFactoredOptimizer`);
* :mod:`second.optim._diagonal`: Hutchinson and Gauss-Newton-Bartlett diagonal estimates and
  the shell of Sophia and AdaHessian (:class:`DiagonalHessianOptimizer`).
"""

from __future__ import annotations

from ._diagonal import (
    DiagonalHessianOptimizer,
    closure_gradients,
    gnb_diagonal,
    hutchinson_diagonal,
    rademacher,
)
from ._gradient_factors import (
    KroneckerFactoredOptimizer,
    MatrixLayout,
    factor_eigenbases,
    factor_increments,
    matrix_layout,
)
from ._preconditioned import (
    PreconditionedOptimizer,
    all_reduce_mean,
    check_betas,
    decoupled_update,
    reject_module,
)

__all__ = [
    "PreconditionedOptimizer",
    "KroneckerFactoredOptimizer",
    "DiagonalHessianOptimizer",
    "MatrixLayout",
    "matrix_layout",
    "factor_increments",
    "factor_eigenbases",
    "rademacher",
    "hutchinson_diagonal",
    "gnb_diagonal",
    "all_reduce_mean",
    "check_betas",
    "decoupled_update",
    "reject_module",
    "closure_gradients",
]
