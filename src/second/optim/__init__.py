"""Optimizers: ``torch.optim.Optimizer`` subclasses built on second's curvature."""

from ..newton.trust_region import SubproblemResult, exact_trust_region, steihaug_cg
from ._minimize import OptimizeResult, minimize
from ._plot import plot_history
from .adahessian import AdaHessian
from .gauss_newton import GaussNewton
from .hessian_free import HessianFree
from .kfac import KFAC
from .lissa import LiSSA
from .newton import NewtonCG
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia, SophiaH

__all__ = [
    "KFAC",
    "NewtonCG",
    "GaussNewton",
    "HessianFree",
    "LiSSA",
    "SOAP",
    "Shampoo",
    "Sophia",
    "SophiaH",
    "AdaHessian",
    "minimize",
    "OptimizeResult",
    "plot_history",
    "steihaug_cg",
    "exact_trust_region",
    "SubproblemResult",
]
