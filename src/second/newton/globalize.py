r"""Globalization of the Newton core: strong-Wolfe line search, radius and damping updates.

Pure functions of scalars (and a closure for the line search): the trust-region radius
update and the Levenberg-Marquardt damping update both read the ratio of actual to
predicted reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .._deprecation import renamed_property
from .trust_region import update_radius

__all__ = ["LineSearchResult", "strong_wolfe", "update_radius", "lm_damping_update"]


@dataclass
class LineSearchResult:
    r"""What :func:`strong_wolfe` returns.

    Attributes:
        t: the step length (0 when the search failed).
        f: the objective at ``x + t d``.
        g: the gradient there (whatever ``phi`` returned with it).
        evaluations: calls of ``phi``.
        converged: whether ``t`` satisfies the strong Wolfe conditions (``success`` is its
            deprecated spelling).
        message: why it stopped.
    """

    t: float
    f: float
    g: object
    evaluations: int
    converged: bool
    message: str

    success = renamed_property("success", "converged")


def _cubic_min(t1, f1, d1, t2, f2, d2, lo, hi):
    """Minimizer of the cubic through (t1, f1, d1), (t2, f2, d2), clipped to [lo, hi]."""
    d_1 = d1 + d2 - 3 * (f1 - f2) / (t1 - t2)
    sq = d_1 * d_1 - d1 * d2
    if sq >= 0:
        d_2 = math.copysign(math.sqrt(sq), t2 - t1)
        t = t2 - (t2 - t1) * ((d2 + d_2 - d_1) / (d2 - d1 + 2 * d_2))
        if math.isfinite(t):
            return min(max(t, lo), hi)
    return 0.5 * (lo + hi)


def strong_wolfe(
    phi: Callable[[float], tuple[float, float, object]],
    f0: float,
    dphi0: float,
    *,
    t0: float = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    t_max: float = 1e10,
    max_evals: int = 25,
) -> LineSearchResult:
    r"""A step length satisfying the strong Wolfe conditions (Nocedal & Wright, Algs. 3.5-3.6).

    Finds :math:`t > 0` with

    .. math:: \phi(t) \le \phi(0) + c_1 t \phi'(0), \qquad |\phi'(t)| \le c_2 |\phi'(0)|,

    by bracketing (doubling from ``t0``) and zooming with safeguarded cubic interpolation.
    A non-finite :math:`\phi(t)` counts as "too far" and shrinks the bracket. When
    ``max_evals`` runs out, the best point satisfying the sufficient-decrease condition
    is returned with ``converged=False``; if there is none, ``t = 0`` (a line-search failure:
    the caller must not move).

    Args:
        phi: ``t -> (phi(t), phi'(t), payload)``: the objective along the direction and its
            slope, plus whatever the caller wants back for the accepted point (a gradient).
        f0: :math:`\phi(0)`.
        dphi0: :math:`\phi'(0) < 0`.
        t0: first trial step (default 1: the Newton step).
        c1: sufficient-decrease constant (default 1e-4).
        c2: curvature constant, :math:`c_1 < c_2 < 1` (default 0.9).
        t_max: largest step (default 1e10).
        max_evals: evaluation limit (default 25).

    Returns:
        A :class:`LineSearchResult`.

    Raises:
        ValueError: ``dphi0 >= 0`` (not a descent direction) or bad constants.

    Example:
        >>> res = strong_wolfe(lambda t: ((t - 3) ** 2, 2 * (t - 3), None), 9.0, -6.0)
        >>> res.converged, res.t   # the first trial already meets both conditions
        (True, 1.0)
    """
    if not dphi0 < 0:
        raise ValueError(f"strong_wolfe needs a descent direction (phi'(0) = {dphi0} >= 0)")
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    evals = 0
    best = (0.0, f0, None)  # best sufficient-decrease point

    def ev(t):
        nonlocal evals, best
        evals += 1
        f, d, pay = phi(t)
        if not (math.isfinite(f) and math.isfinite(d)):
            return math.inf, math.nan, pay
        if f <= f0 + c1 * t * dphi0 and f < best[1]:
            best = (t, f, pay)
        return f, d, pay

    def fail(msg):
        t, f, pay = best
        return LineSearchResult(t, f, pay, evals, False, msg if t > 0 else msg + "; no decrease")

    t_prev, f_prev, d_prev = 0.0, f0, dphi0
    t = min(t0, t_max)
    lo = hi = None
    while evals < max_evals:
        f, d, pay = ev(t)
        if not math.isfinite(f) or f > f0 + c1 * t * dphi0 or (evals > 1 and f >= f_prev):
            lo, hi = (t_prev, f_prev, d_prev), (t, f, d)
            break
        if abs(d) <= -c2 * dphi0:
            return LineSearchResult(t, f, pay, evals, True, "strong Wolfe conditions met")
        if d >= 0:
            lo, hi = (t, f, d), (t_prev, f_prev, d_prev)
            break
        if t >= t_max:
            return fail("reached t_max")
        t_prev, f_prev, d_prev = t, f, d
        t = min(2.0 * t, t_max)
    else:
        return fail("evaluation limit while bracketing")
    # zoom: lo satisfies sufficient decrease with slope pointing into the bracket
    while evals < max_evals:
        (ta, fa, da), (tb, fb, db) = lo, hi
        a, b = min(ta, tb), max(ta, tb)
        if b - a <= 1e-12 * max(b, 1e-300):
            break
        if math.isfinite(fb) and math.isfinite(db):
            t = _cubic_min(ta, fa, da, tb, fb, db, a + 0.1 * (b - a), b - 0.1 * (b - a))
        else:
            t = 0.5 * (a + b) if not math.isfinite(fb) else a + 0.5 * (b - a)
        f, d, pay = ev(t)
        if not math.isfinite(f) or f > f0 + c1 * t * dphi0 or f >= fa:
            hi = (t, f, d)
            continue
        if abs(d) <= -c2 * dphi0:
            return LineSearchResult(t, f, pay, evals, True, "strong Wolfe conditions met")
        if d * (tb - ta) >= 0:
            hi = lo
        lo = (t, f, d)
    return fail("evaluation limit while zooming")


def lm_damping_update(damping: float, nu: float, rho: float) -> tuple[float, float]:
    r"""Nielsen's (1999) Levenberg-Marquardt damping update from the reduction ratio.

    Accepted step (:math:`\rho > 0`): :math:`\lambda \leftarrow \lambda \max(1/3, 1 -
    (2\rho - 1)^3)`, :math:`\nu \leftarrow 2`; rejected: :math:`\lambda \leftarrow \nu\lambda`,
    :math:`\nu \leftarrow 2\nu` (repeated rejections raise the damping ever faster).

    Args:
        damping: :math:`\lambda`.
        nu: the growth factor :math:`\nu`.
        rho: actual / predicted reduction (pass a value :math:`\le 0` for a rejected step).

    Returns:
        ``(damping, nu)``.

    Example:
        >>> lm_damping_update(1.0, 2.0, -1.0)
        (2.0, 4.0)
    """
    if rho > 0:
        return damping * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
    return damping * nu, 2.0 * nu
