r"""Laplace approximations of a trained network's posterior, on the library's curvature.

:class:`Laplace` fits :math:`N(\theta_*, \Lambda^{-1})` with
:math:`\Lambda = H / (\sigma^2 T) + \mathrm{diag}(\delta)` from the GGN (or the Hessian, or a
Fisher) of the summed negative log-likelihood, in one of the structures ``"full"``,
``"diag"``, ``"lowrank"``, ``"kfac"``, ``"ekfac"``, over all parameters, the last layer, or
a chosen subset. The prior precision :math:`\delta` is a damping applied at call time, so the
log marginal likelihood and its optimum (:meth:`Laplace.optimize_prior_precision`, by
MacKay's fixed point or by gradient) cost no refit. Predictives: the linearised network
with the (centred) probit or Laplace-bridge link or by sampling, the network itself by
sampling. :class:`OnlinePrior` tunes the prior during training; the defaults (last layer,
full GGN, centred probit) with the prior of such a training are the configuration that
``docs/laplace.md`` recommends. :mod:`second.laplace.metrics`
scores calibration (NLL, ECE, Brier). ``docs/laplace.md`` says which configuration to use.
"""

from . import metrics
from ._laplace import Laplace, PriorOptimizationResult
from ._online import OnlinePrior
from .metrics import brier, ece, nll, reliability

__all__ = [
    "Laplace",
    "PriorOptimizationResult",
    "OnlinePrior",
    "metrics",
    "nll",
    "ece",
    "brier",
    "reliability",
]
