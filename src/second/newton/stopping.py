r"""Stopping rules of the Newton core: one place that says why a run stops."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..func.vectors import safe_norm

__all__ = ["Criteria", "diverging_iterates", "ray_decreases", "limit_message", "safe_norm"]


@dataclass
class Criteria:
    r"""The stopping tests of a Newton-type run, checked in this order by :meth:`check`.

    1. ``"nonfinite"``: the objective or gradient is NaN/Inf (never a success);
    2. ``"converged"``: :math:`\|\nabla f(x)\|_2 \le` ``gtol``;
    3. ``"unbounded"`` (when ``detect_unbounded``): :func:`diverging_iterates` in one of
       three forms: the iterates run off while ``f`` levels off (``unbounded_share``; confirmed
       by the ray test :func:`ray_decreases` when the loop passes one, as the core's loops
       do: a coercive objective, such as an ill-conditioned quadratic whose minimizer is far
       away, rises along the drift far enough out), or they
       grow geometrically (``unbounded_rate`` over each of the last two windows) while the
       gradient is still at least ``unbounded_gfloor`` of its initial norm and the decrease
       of ``f`` slows (the last window's no larger than the one before: a trust-region walk
       to a far minimizer grows its steps and its decrease together), or they grow
       geometrically while ``f`` falls ever faster (the last window's decrease at least the
       one before), far below its start (:math:`f < f_0 - \mathrm{unbounded\_drop}\,
       (|f_0| + 1)`), with the gradient still steep, and the ray test confirms it: ``f``
       heads for :math:`-\infty` (:math:`-\|x\|^2`, a saddle, a linear function);
    4. ``"maxiter"``: ``maxiter`` iterations;
    5. ``"time"``: the wall-clock ``deadline`` (a ``time.perf_counter()`` value) passed.

    ``"stalled"`` (a step or trust radius below ``xtol``) is decided by the globalization.

    Attributes:
        gtol: gradient-norm tolerance.
        maxiter: iteration limit.
        deadline: absolute ``perf_counter`` time, or ``inf``.
        xtol: smallest step / radius before the run is declared stalled (default 1e-14,
            relative to ``1 + ||x||``; :func:`second.minimize` raises its default to twice
            the machine epsilon of ``x0``'s dtype, 2.4e-7 for float32).
        detect_unbounded: apply the unbounded test (default ``True``).
        unbounded_factor: growth of :math:`\|x\|` over :math:`\max(1, \|x_0\|)` it needs
            (default 10).
        unbounded_window: consecutive accepted steps that must each increase :math:`\|x\|`
            (default 10).
        unbounded_share: largest share of the total decrease of ``f`` the last window may
            hold in the levelling-off test (default 0.01).
        unbounded_gfloor: the unbounded test applies while :math:`\|\nabla f\|` is at
            least this share of its initial value (default 1e-2): a run that has reduced its
            gradient a hundredfold is converging, however far it went (teacher-student 4-8-1,
            seed 3, grows ||x|| geometrically to a minimizer at ||x|| = 528 with the gradient
            at 1.3e-3 of its initial norm; the random-target sigmoid network, whose infimum
            is not attained, is caught at 2.9e-2 or above).
        unbounded_reach: how far the ray test goes, in multiples of :math:`\max(1, \|x\|)`
            (default 1e3).
        unbounded_rate: the growth of :math:`\|x\|` each of the last two windows must show
            (default 1.15: sustained geometric growth).
        unbounded_drop: how far ``f`` must have fallen, in units of :math:`|f_0| + 1`, for
            the accelerating form (default 10; on the suite's converging problems that form's
            other conditions never hold together).

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
    unbounded_rate: float = 1.15
    unbounded_gfloor: float = 1e-2
    unbounded_reach: float = 1e3
    unbounded_drop: float = 10.0

    def check(
        self,
        *,
        it: int,
        f: float,
        gnorm: float,
        now: float,
        xnorms: Sequence[float],
        fvals: Sequence[float] | None = None,
        gnorm0: float | None = None,
        ray: Callable[[], bool] | None = None,
        near: Callable[[], bool] | None = None,
    ) -> str | None:
        r"""The reason to stop now, or ``None``.

        ``gnorm0`` is the initial gradient norm; ``ray`` (optional) confirms the
        levelling-off and accelerating forms of the unbounded test, ``near`` (optional) vetoes
        the geometric form: whether the local quadratic model is convex with its minimizer
        within :math:`\|x\|` of ``x`` (both called only when the rest of their form holds).
        A trust region whose radius doubles on the way to a far minimizer grows
        :math:`\|x\|` geometrically too (Brown's badly scaled function, a strongly convex
        objective with its minimizer at :math:`\|x^*\| = 837`, were reported unbounded); a
        saturating network's model has negative curvature or no near minimizer.
        """
        if not (math.isfinite(f) and math.isfinite(gnorm)):
            return "nonfinite"
        if gnorm <= self.gtol:
            return "converged"
        if self.detect_unbounded:
            common = dict(factor=self.unbounded_factor, window=self.unbounded_window)
            levels_off = diverging_iterates(xnorms, fvals, share=self.unbounded_share, **common)
            steep = gnorm0 is None or gnorm >= self.unbounded_gfloor * gnorm0
            grows = steep and diverging_iterates(xnorms, None, rate=self.unbounded_rate, **common)
            geometric = grows and _decrease_slows(fvals, self.unbounded_window)
            if geometric and near is not None and near():
                geometric = False
            falls = grows and not geometric and self.falls_without_bound(fvals)
            if (levels_off or falls) and ray is not None:
                confirmed = ray()
                levels_off, falls = levels_off and confirmed, falls and confirmed
            if levels_off or geometric or falls:
                return "unbounded"
        if it >= self.maxiter:
            return "maxiter"
        if now > self.deadline:
            return "time"
        return None

    def falls_without_bound(self, fvals: Sequence[float] | None) -> bool:
        r"""Whether ``f`` fell ever faster, far below its start (the accelerating form's test).

        True when the last window's decrease is at least the one before and
        :math:`f < f_0 - \mathrm{unbounded\_drop}\,(|f_0| + 1)` (``fvals[0]`` at
        :math:`x_0`, one value per accepted step).

        Example:
            >>> Criteria(gtol=0.0, maxiter=1).falls_without_bound([-(2.0**k) for k in range(25)])
            True
        """
        return (
            fvals is not None
            and len(fvals) > 0
            and fvals[-1] < fvals[0] - self.unbounded_drop * (abs(fvals[0]) + 1)
            and _decrease_grows(fvals, self.unbounded_window)
        )

    def rejected(self, it: int, radius: float | None, xnorm: float) -> tuple[str, str] | None:
        """After a rejected trial: ``(reason, message)`` to stop with, or ``None`` to retry.

        A trust ``radius`` (``None``: none is kept) below ``xtol (1 + ||x||)`` has stalled;
        ``it`` at ``maxiter`` ends the run.

        Example:
            >>> Criteria(gtol=1e-8, maxiter=5).rejected(2, 1e-20, 1.0)
            ('stalled', 'stalled: trust radius 1.000e-20 below xtol')
        """
        if radius is not None and radius <= self.xtol * (1 + xnorm):
            return "stalled", f"stalled: trust radius {radius:.3e} below xtol"
        if it >= self.maxiter:
            return "maxiter", ""
        return None


def diverging_iterates(
    xnorms: Sequence[float],
    fvals: Sequence[float] | None = None,
    *,
    factor: float = 10.0,
    window: int = 10,
    share: float | None = 0.01,
    rate: float = 1.0,
) -> bool:
    r"""Whether the accepted iterates are running off to infinity while ``f`` levels off.

    True when all of these hold over the last ``window`` accepted steps:

    * :math:`\|x_k\| > \mathrm{factor} \cdot \max(1, \|x_0\|)`;
    * :math:`\|x\|` grew at each of them;
    * it grew geometrically: by at least ``rate`` over the last window and over the one
      before (a saturating network's weights grow exponentially; a walk to a far but finite
      minimizer, or along a valley, grows :math:`\|x\|` at most linearly for that long);
    * (with ``fvals`` and ``share``) they decreased ``f`` by at most ``share`` of its total decrease
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
    if len(xnorms) < (2 * window + 2 if rate > 1 else window + 2):
        return False
    last = xnorms[-(window + 1) :]
    if not xnorms[-1] > factor * max(1.0, xnorms[0]):
        return False
    if not all(b > a for a, b in zip(last[:-1], last[1:])):
        return False
    if rate > 1:
        before = xnorms[-(2 * window + 1)]
        if not (last[-1] >= rate * last[0] and last[0] >= rate * before):
            return False
    if fvals is not None and share is not None and len(fvals) == len(xnorms):
        total = fvals[0] - fvals[-1]
        recent = fvals[-(window + 1)] - fvals[-1]
        if not (math.isfinite(total) and recent <= share * total):
            return False
    return True


def ray_decreases(
    value: Callable[[Tensor], float],
    x: Tensor,
    d: Tensor,
    f: float,
    *,
    reach: float = 1e3,
) -> bool:
    r"""Whether ``f`` keeps falling along the ray :math:`x + t d` out to a far distance.

    Evaluates :math:`f(x + t d)` for :math:`t = 1, 2, 4, \ldots` until
    :math:`\|t d\| \ge \mathrm{reach} \cdot \max(1, \|x\|)`; true when no value
    rises and the last lies below ``f``. A coercive objective (with a finite minimizer and
    growing away from it, e.g. a quadratic, or any loss with an L2 term) rises along every
    ray far enough out, so the test cannot confirm a run on it.

    Args:
        value: ``x -> f(x)`` (no gradient).
        x: the current iterate (flat).
        d: the drift, e.g. the last iterate minus one from ``window`` steps back.
        f: :math:`f(x)`.
        reach: how far to go, in multiples of :math:`\max(1, \|x\|)` (default 1e3).

    Returns:
        Whether ``f`` falls along the whole ray.

    Example:
        >>> import torch
        >>> x, d = torch.tensor([5.0]), torch.tensor([1.0])
        >>> ray_decreases(lambda z: float(torch.exp(-z).sum()), x, d, float(torch.exp(-x)))
        True
        >>> ray_decreases(lambda z: float((z**2).sum()), x, -d, 25.0)  # overshoots the minimum
        False
    """
    dn = float(d.norm())
    if not dn > 0 or not math.isfinite(f):
        return False
    target = reach * max(1.0, float(x.norm()))
    t, prev = 1.0, f
    while True:
        ft = value(x + t * d)
        if not ft <= prev:  # rises (or NaN)
            return False
        prev = ft
        if t * dn >= target:
            return prev < f
        t *= 2.0


def _decrease_slows(fvals: Sequence[float] | None, window: int) -> bool:
    """Whether the last window decreased ``f`` no more than the window before it."""
    if fvals is None or len(fvals) < 2 * window + 1:
        return fvals is None
    last = fvals[-(window + 1)] - fvals[-1]
    before = fvals[-(2 * window + 1)] - fvals[-(window + 1)]
    return last <= before


def _decrease_grows(fvals: Sequence[float], window: int) -> bool:
    """Whether the last window decreased ``f`` (by > 0) at least as much as the one before."""
    if len(fvals) < 2 * window + 1:
        return False
    last = fvals[-(window + 1)] - fvals[-1]
    before = fvals[-(2 * window + 1)] - fvals[-(window + 1)]
    return last > 0 and last >= before


def limit_message(maxiter: int, gnorms: Sequence[float], gtol: float | None = None) -> str:
    """Why the iteration limit stopped the run, and where the gradient norm went.

    Example:
        >>> limit_message(5, [1.0, 1e-3])
        'stopped: iteration limit (5) reached before the tolerance; ||grad|| fell from 1.000e+00 to 1.000e-03 (factor 1.00e+03); raise maxiter to continue'
        >>> limit_message(0, [2.0], gtol=1e-6)
        'stopped: iteration limit (0) reached before the tolerance; ||grad|| = 2.000e+00 > gtol = 1.0e-06'
    """
    msg = f"stopped: iteration limit ({maxiter}) reached before the tolerance"
    if not gnorms:
        return msg + "; raise maxiter to continue"
    g0, g1 = gnorms[0], gnorms[-1]
    if not (g0 is not None and g1 is not None and math.isfinite(g0) and math.isfinite(g1)):
        return msg + "; raise maxiter to continue"
    if len(gnorms) == 1:  # no iteration ran (maxiter=0)
        return (
            msg + f"; ||grad|| = {g1:.3e}" + (f" > gtol = {gtol:.1e}" if gtol is not None else "")
        )
    if g1 < g0:
        return (
            msg + f"; ||grad|| fell from {g0:.3e} to {g1:.3e} (factor {g0 / max(g1, 1e-300):.2e})"
            "; raise maxiter to continue"
        )
    return (
        msg + f"; ||grad|| grew from {g0:.3e} to {g1:.3e} (factor {g1 / max(g0, 1e-300):.2e}); "
        "raise maxiter to continue, or check that the objective is bounded below"
    )
