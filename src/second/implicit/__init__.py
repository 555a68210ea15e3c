r"""Implicit differentiation: hypergradients, implicit-root solvers and iMAML.

* :func:`hypergradient` -- :math:`\mathrm{d} L_\mathrm{out}/\mathrm{d} h` through the
  optimum of an inner problem, by the implicit function theorem.
* :func:`implicit_root` -- a decorator that gives any inner solver implicit gradients
  through ordinary autograd; :func:`stationary` builds its optimality condition.
* :mod:`second.implicit.imaml` -- the proximal inner problem of iMAML and its
  meta-gradient.
"""

from . import imaml
from ._hypergradient import HypergradientResult, hypergradient
from ._root import implicit_root, stationary

__all__ = ["hypergradient", "HypergradientResult", "implicit_root", "stationary", "imaml"]
