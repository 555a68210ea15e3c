"""The Newton core: directions, globalization, stopping rules and results, as pure functions.

``second.minimize`` and the Newton-type optimizers of :mod:`second.optim` run on it.

* direction: :func:`truncated_cg` (Eisenstat-Walker :func:`forcing_term`, warm start,
  negative curvature, residuals re-orthogonalized by :class:`ResidualBasis`), :func:`steihaug_cg` and :func:`exact_trust_region` (trust-region
  subproblems), :func:`dense_newton_direction`, :func:`model_cg` (damped CG with Martens'
  progress rule); :data:`RCOND`, the eigenvalue rounding level of the dense ones;
* preconditioners: :class:`LBFGSPreconditioner`, :func:`diagonal_preconditioner`;
* globalization: :func:`strong_wolfe`, :func:`update_radius`, :func:`lm_damping_update`;
* one globalized step (shared by the loops and the optimizers): :func:`trust_region_step`
  (with :func:`cg_subproblem`), :func:`damped_step` (Levenberg-Marquardt, Nielsen's or
  :func:`more_damping_update`), :class:`StepResult`;
* stopping: :class:`Criteria`, :func:`diverging_iterates`;
* loops: :func:`newton_cg`, :func:`newton_dense`, :func:`gauss_newton` (least squares in
  residual form, :class:`LeastSquaresObjective`); result: :class:`OptimizeResult`.
"""

from .direction import (
    RCOND,
    REORTH_MEMORY,
    DirectionInfo,
    ResidualBasis,
    dense_newton_direction,
    forcing_term,
    model_minimizer_within,
    truncated_cg,
)
from .globalize import LineSearchResult, lm_damping_update, strong_wolfe, update_radius
from .least_squares import LeastSquaresObjective, gauss_newton
from .loop import newton_cg, newton_dense
from .model_cg import InnerCGResult, model_cg
from .objective import Objective
from .precond import LBFGSPreconditioner, diagonal_preconditioner
from .result import OptimizeResult
from .steps import (
    StepResult,
    cg_subproblem,
    damped_solve,
    damped_step,
    more_damping_update,
    trust_region_step,
)
from .stopping import Criteria, diverging_iterates
from .trust_region import SubproblemResult, exact_trust_region, steihaug_cg

__all__ = [
    "truncated_cg",
    "forcing_term",
    "dense_newton_direction",
    "DirectionInfo",
    "ResidualBasis",
    "REORTH_MEMORY",
    "RCOND",
    "steihaug_cg",
    "exact_trust_region",
    "SubproblemResult",
    "model_cg",
    "InnerCGResult",
    "LBFGSPreconditioner",
    "diagonal_preconditioner",
    "strong_wolfe",
    "LineSearchResult",
    "update_radius",
    "lm_damping_update",
    "trust_region_step",
    "cg_subproblem",
    "damped_step",
    "damped_solve",
    "more_damping_update",
    "StepResult",
    "Criteria",
    "diverging_iterates",
    "model_minimizer_within",
    "newton_cg",
    "newton_dense",
    "gauss_newton",
    "LeastSquaresObjective",
    "Objective",
    "OptimizeResult",
]
