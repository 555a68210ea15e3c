r"""The result record of the Newton core (SciPy's ``OptimizeResult`` fields, our vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .._deprecation import renamed_property

__all__ = ["OptimizeResult"]


@dataclass
class OptimizeResult:
    r"""What :func:`second.minimize` returns.

    Attributes:
        x: the solution (detached, shaped like ``x0``).
        fun: the objective at ``x``.
        grad_norm: :math:`\|\nabla f(x)\|_2`.
        nit: iterations.
        nfev: objective evaluations.
        ngev: gradient evaluations.
        matvecs: Hessian- (or Gauss-Newton-) vector products (a dense curvature counts ``n``).
        converged: whether the gradient tolerance was met at ``x`` (never at a NaN).
        message: why it stopped.
        method: the method that ran (with ``method="auto"``, the one it chose).
        status: a short code for why it stopped: ``"converged"``, ``"maxiter"``, ``"time"``,
            ``"unbounded"`` (diverging iterates: the objective appears unbounded below or its
            infimum is not attained), ``"stalled"``, ``"nonfinite"``, ``"line_search"``, ``"matvecs"`` (Newton-CG's
            ``max_matvecs`` spent).
        history: per-iteration records (``nfev, ngev, matvecs, loss, grad_norm``, ...).
        time: wall-clock seconds.
    """

    x: Tensor
    fun: float
    grad_norm: float
    nit: int
    nfev: int
    ngev: int
    matvecs: int
    converged: bool
    message: str
    method: str
    status: str = ""
    history: list[dict] = field(default_factory=list, repr=False)
    time: float = 0.0

    @property
    def cost(self) -> int:
        """Gradient evaluations plus twice the curvature products (the benchmark's unit)."""
        return self.ngev + 2 * self.matvecs

    success = renamed_property("success", "converged")
    nhvp = renamed_property("nhvp", "matvecs")
