r"""Stopping rules of the Newton core: one place that says why a run stops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Criteria", "diverging_iterates", "limit_message"]


@dataclass
class Criteria:
    r"""The stopping tests of a Newton-type run, checked in this order by :meth:`check`.

    1. ``"nonfinite"``: the objective or gradient is NaN/Inf (never a success);
    2. ``"converged"``: :math:`\|\nabla f(x)\|_2 \le` ``gtol``;
    3. ``"unbounded"``: :func:`diverging_iterates` (when ``detect_unbounded``);
    4. ``"maxiter"``: ``maxiter`` iterations;
    5. ``"time"``: the wall-clock ``deadline`` (a ``time.perf_counter()`` value) passed.

    ``"stalled"`` (a step or trust radius below ``xtol``) is decided by the globalization.

    Attributes:
        gtol: gradient-norm tolerance.
        maxiter: iteration limit.
        deadline: absolute ``perf_counter`` time, or ``inf``.
        xtol: smallest step / radius before the run is declared stalled (default 1e-14,
            relative to ``1 + ||x||``).
        detect_unbounded: apply the unbounded test (default ``True``).
        unbounded_factor: growth of :math:`\|x\|` over :math:`\max(1, \|x_0\|)` it needs
            (default 10).
        unbounded_window: consecutive accepted steps that must each increase :math:`\|x\|`
            (default 10).
        unbounded_share: largest share of the total decrease of ``f`` the last window may
            hold (default 0.01).

    Example:
        >>> c = Criteria(gtol=1e-8, maxiter=10)
        >>> c.check(it=3, f=1.0, gnorm=1e-9, now=0.0, xnorms=[1.0])
        'converged'
    """

    gtol: float
    maxiter: int
    deadline: float = math.inf
    xtol: float = 1e-14
    detect_unbounded: bool = True
    unbounded_factor: float = 10.0
    unbounded_window: int = 10
    unbounded_share: float = 0.01

    def check(
        self,
        *,
        it: int,
        f: float,
        gnorm: float,
        now: float,
        xnorms: Sequence[float],
        fvals: Sequence[float] | None = None,
    ) -> str | None:
        """The reason to stop now, or ``None``."""
        if not (math.isfinite(f) and math.isfinite(gnorm)):
            return "nonfinite"
        if gnorm <= self.gtol:
            return "converged"
        if self.detect_unbounded and diverging_iterates(
            xnorms,
            fvals,
            factor=self.unbounded_factor,
            window=self.unbounded_window,
            share=self.unbounded_share,
        ):
            return "unbounded"
        if it >= self.maxiter:
            return "maxiter"
        if now > self.deadline:
            return "time"
        return None


def diverging_iterates(
    xnorms: Sequence[float],
    fvals: Sequence[float] | None = None,
    *,
    factor: float = 10.0,
    window: int = 10,
    share: float = 0.01,
) -> bool:
    r"""Whether the accepted iterates are running off to infinity while ``f`` levels off.

    True when all of these hold over the last ``window`` accepted steps:

    * :math:`\|x_k\| > \mathrm{factor} \cdot \max(1, \|x_0\|)`;
    * :math:`\|x\|` grew at each of them;
    * (with ``fvals``) they decreased ``f`` by at most ``share`` of its total decrease
      :math:`f_0 - f_k`: the loss creeps towards a limit while the iterates run.

    A run minimizing a function whose infimum is not attained (a network fitted to random
    targets, whose units saturate) behaves so; a run converging to a far-away minimizer
    grows :math:`\|x\|` while ``f`` still falls fast, and one near a minimizer stops
    growing :math:`\|x\|`. ``xnorms[0]``, ``fvals[0]`` are at :math:`x_0`; the rest after
    each accepted step.

    Example:
        >>> diverging_iterates([1.0] + [2.0**k for k in range(1, 12)])
        True
        >>> diverging_iterates([1.0, 2.0, 3.0])
        False
        >>> xs = [1.0] + [2.0**k for k in range(1, 12)]
        >>> diverging_iterates(xs, [12.0 - k for k in range(12)])  # f still falls steadily
        False
    """
    if len(xnorms) < window + 2:
        return False
    last = xnorms[-(window + 1) :]
    if not xnorms[-1] > factor * max(1.0, xnorms[0]):
        return False
    if not all(b > a for a, b in zip(last[:-1], last[1:])):
        return False
    if fvals is not None and len(fvals) == len(xnorms):
        total = fvals[0] - fvals[-1]
        recent = fvals[-(window + 1)] - fvals[-1]
        if not (math.isfinite(total) and recent <= share * total):
            return False
    return True


def limit_message(maxiter: int, gnorms: Sequence[float]) -> str:
    """Why the iteration limit stopped the run, and how far the gradient fell."""
    msg = f"stopped: iteration limit ({maxiter}) reached before the tolerance"
    if gnorms:
        g0, g1 = gnorms[0], gnorms[-1]
        if g0 and g1 is not None and math.isfinite(g0) and math.isfinite(g1):
            msg += f"; ||grad|| fell from {g0:.3e} to {g1:.3e} (factor {g0 / max(g1, 1e-300):.2e})"
    return msg + "; raise maxiter to continue"
