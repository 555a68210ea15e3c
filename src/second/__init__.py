"""second: second-order optimization for PyTorch.

Curvature-vector products (:func:`hvp`, :func:`gvp`, :func:`jvp`), exact dense
curvature for small models, matrix-free curvature operators, inverse-curvature
solvers that report failure honestly, spectral tools, and the applications built on
them.

``from second import *`` gives the seed notebook's names with their signatures.
"""

from . import laplace, operators, optim  # subpackages: second.optim.KFAC, ...
from ._errors import (
    ConvergenceWarning,
    NegativeCurvatureWarning,
    NonDeterministicDataError,
    NonFiniteError,
)
from ._progress import set_progress
from .compat import clip_grad_norm, conjugate_gradient, fixed_point, neumann
from .data import Task
from .func import (
    exact_fisher,
    exact_ggn,
    exact_hessian,
    gvp,
    hvp,
    jvp,
    parameters_to_vector,
    vector_to_parameters,
    vjp,
)
from .implicit import HypergradientResult, hypergradient, imaml, implicit_root
from .influence import Influence, TopK, per_example_gradients
from .kfac import EKFACOperator, KFACOperator
from .metrics import cosine_similarity, relative_error
from .operators import *  # noqa: F403  (the operator types: operators.__all__)
from .optim import OptimizeResult, minimize
from .solvers import (
    InverseOperator,
    LowRankInverse,
    SolveResult,
    cg,
    dense,
    lissa,
    lowrank,
    lsmr,
    minres,
    neumann_solve,
    solve,
)
from .spectral import diagonal, eigsh, spectral_density, trace

__version__ = "0.1.0"

__all__ = [
    # seed API
    "hvp",
    "gvp",
    "jvp",
    "vjp",
    "parameters_to_vector",
    "vector_to_parameters",
    "exact_hessian",
    "exact_ggn",
    "exact_fisher",
    "conjugate_gradient",
    "neumann",
    "fixed_point",
    "clip_grad_norm",
    # metrics
    "relative_error",
    "cosine_similarity",
    # operators
    *operators.__all__,
    "Task",
    # approximations
    "KFACOperator",
    "EKFACOperator",
    # solvers
    "solve",
    "SolveResult",
    "cg",
    "minres",
    "lsmr",
    "lissa",
    "lowrank",
    "dense",
    "LowRankInverse",
    "InverseOperator",
    "neumann_solve",
    # spectral
    "eigsh",
    "trace",
    "diagonal",
    "spectral_density",
    # Newton-type optimization (optimizers live in second.optim)
    "optim",
    "laplace",
    "minimize",
    "OptimizeResult",
    # implicit differentiation
    "hypergradient",
    "HypergradientResult",
    "implicit_root",
    "imaml",
    # influence functions
    "Influence",
    "TopK",
    "per_example_gradients",
    # progress bars (one switch for the library)
    "set_progress",
    # errors
    "ConvergenceWarning",
    "NegativeCurvatureWarning",
    "NonFiniteError",
    "NonDeterministicDataError",
]
