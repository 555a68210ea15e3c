"""Inverse-curvature solvers: each returns a :class:`SolveResult`."""

from ._cg import cg
from ._dense import dense
from ._inverse import InverseOperator
from ._lissa import LissaRecursion, lissa, lissa_recursion
from ._lowrank import LowRankInverse, lowrank, lowrank_inverse
from ._lsmr import lsmr
from ._minres import minres
from ._neumann import neumann, neumann_solve
from ._result import SolveResult, report
from ._solve import METHODS, choose_method, solve

__all__ = [
    "SolveResult",
    "solve",
    "choose_method",
    "METHODS",
    "cg",
    "minres",
    "lsmr",
    "neumann_solve",
    "neumann",
    "lissa",
    "lissa_recursion",
    "LissaRecursion",
    "lowrank",
    "dense",
    "LowRankInverse",
    "lowrank_inverse",
    "InverseOperator",
    "report",
]
