r"""One globalized Newton step: the unit the core's loops and the optimizers of ``second.optim`` share.

A step is a model (a subproblem solver or a damped solve), one trial evaluation, and the
ratio of actual to predicted reduction,

.. math:: \rho = \frac{f(x) - f(x + p)}{m(0) - m(p)},

which accepts or rejects the step and adapts the radius (trust region) or the damping
(Levenberg-Marquardt). The loops of :mod:`second.newton.loop` call these functions on a
flat vector; :class:`~second.optim.NewtonCG` and :class:`~second.optim.GaussNewton` call
them on the flattened parameters, with a trial that scatters the step and runs the closure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._deprecation import renamed_keyword
from .globalize import lm_damping_update
from .model_cg import model_cg
from .trust_region import SubproblemResult, steihaug_cg, update_radius

__all__ = [
    "StepResult",
    "trust_region_step",
    "cg_subproblem",
    "damped_step",
    "more_damping_update",
    "damped_solve",
    "DAMPING_RULES",
    "NOISE",
]

#: A predicted change of ``f`` below ``NOISE * |f|`` (about the square root of float64's
#: epsilon) may be mostly rounding: on the condition-1e8 quadratic ``f``'s rounding is ~1e-9
#: of ``|f|``. There, when the change of ``f`` disagrees with the model, the actual reduction
#: is measured by the trapezoidal rule on the two gradients instead (exact for a quadratic; the
#: trial gradient is needed anyway if the step is accepted). With the rounding threshold alone
#: the noisy ``f`` differences collapsed the trust radius there and Newton-CG took 22,198
#: products instead of 14,769 (BENCHMARKS.md).
NOISE = 1e-8

#: Below ``ROUNDING * |f|`` a change of ``f`` is rounding whatever it looks like.
ROUNDING = 1e-11

#: Damping rules of :func:`damped_step`.
DAMPING_RULES = ("nielsen", "more")

Trial = Callable[[Tensor], tuple[float, Callable]]


@dataclass
class StepResult:
    r"""One globalized attempt.

    Attributes:
        accepted: whether :math:`\rho > \eta` (the caller keeps ``x + step``).
        step: the step :math:`p`.
        rho: actual over predicted reduction (``-inf`` for a non-finite trial value).
        predicted_reduction: :math:`m(0) - m(p)` (not positive: no step was tried).
        f: the objective at the trial point (``nan`` when none was tried).
        finish: the trial's ``finish(graph) -> (gradient, product)`` (``None`` if no trial).
        grad: the trial gradient when it was needed for :math:`\rho` (else ``None``).
        product: the trial's curvature product with it (else ``None``).
        radius: the updated trust radius (trust-region steps; else ``nan``).
        damping: the updated damping (damped steps; else ``nan``).
        nu: Nielsen's growth factor after the update (damped steps).
        sub: the subproblem result (trust-region steps), for re-cutting its CG path.
    """

    accepted: bool
    step: Tensor
    rho: float
    predicted_reduction: float
    f: float
    finish: Callable | None = None
    grad: Tensor | None = None
    product: Callable | None = None
    radius: float = math.nan
    damping: float = math.nan
    nu: float = 2.0
    sub: SubproblemResult | None = None


def _ratio(f: float, g: Tensor, step: Tensor, pred: float, f_try: float, finish):
    """``(rho, grad, product)``: the reduction ratio, with the trapezoidal rule near rounding.

    Below ``ROUNDING * |f|`` the difference of ``f`` is rounding: the trapezoidal rule on the
    two gradients measures the reduction. Up to ``NOISE * |f|`` it may be (an ill-conditioned
    ``f`` rounds far above its epsilon): the trapezoidal rule is used there only when the
    difference of ``f`` disagrees with the quadratic model (a ratio off 1 by more than a half,
    which a step this small rarely shows unless ``f`` is noise).
    """
    if not math.isfinite(f_try):
        return -math.inf, None, None
    actual, g_try, prod = f - f_try, None, None
    scale = max(abs(f), abs(f_try))
    if pred < ROUNDING * scale or (pred < NOISE * scale and abs(actual / pred - 1) > 0.5):
        g_try, prod = finish(True)
        actual = -0.5 * float(torch.dot(g + g_try, step))
    return actual / pred, g_try, prod


def trust_region_step(
    f: float,
    g: Tensor,
    radius: float,
    subproblem: Callable[[float], SubproblemResult],
    trial: Trial,
    *,
    eta: float = 0.1,
    max_radius: float = 1e10,
) -> StepResult:
    r"""One trust-region attempt: solve the subproblem, try the step, update the radius.

    .. math:: p = \arg\min_{\|p\| \le \Delta} g^\top p + \tfrac12 p^\top H p, \qquad
              \text{accept if } \rho > \eta,

    and :math:`\Delta` is updated by :func:`~second.newton.update_radius`. When the change
    of ``f`` is below rounding (:data:`NOISE`), the actual reduction is
    :math:`-\tfrac12 (g + g_+)^\top p` (the trapezoidal rule), which needs the trial gradient.

    Args:
        f: the objective at the current point.
        g: its flat gradient.
        radius: :math:`\Delta`.
        subproblem: ``radius -> SubproblemResult`` (e.g. Steihaug CG, or its stored path cut
            at a smaller radius, or :func:`~second.newton.exact_trust_region`).
        trial: ``p -> (f(x + p), finish)``, ``finish(graph) -> (gradient, product)``.
        eta: acceptance threshold on :math:`\rho` (default 0.1).
        max_radius: largest radius (default 1e10).

    Returns:
        A :class:`StepResult` (``radius`` updated); ``predicted_reduction <= 0`` means the
        model predicts no decrease and no trial was made.

    Example:
        >>> from second.newton import exact_trust_region
        >>> H = torch.eye(2, dtype=torch.float64); g = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> fun = lambda p: (0.5 * float(((g + p) ** 2).sum()) - 0.5, None)
        >>> r = trust_region_step(0.0, g, 10.0, lambda d: exact_trust_region(H, g, d), fun)
        >>> r.accepted, r.step[0].item(), r.rho
        (True, -1.0, 1.0)
    """
    sub = subproblem(radius)
    pred = sub.predicted_reduction
    if not pred > 0:
        return StepResult(False, sub.step, math.nan, pred, math.nan, radius=radius, sub=sub)
    f_try, finish = trial(sub.step)
    rho, g_try, prod = _ratio(f, g, sub.step, pred, f_try, finish)
    new_radius = update_radius(radius, rho, sub.step_norm, sub.on_boundary, max_radius=max_radius)
    accepted = rho > eta
    if not accepted:
        # a rejected step shrinks the region whatever eta is: with eta above update_radius'
        # shrink threshold a step with shrink_below < rho <= eta kept the radius and the same
        # step was tried again until maxiter
        new_radius = min(new_radius, 0.25 * sub.step_norm)
    return StepResult(
        accepted, sub.step, rho, pred, f_try, finish, g_try, prod, radius=new_radius, sub=sub
    )


def cg_subproblem(
    hvp: Callable[[Tensor], Tensor],
    g: Tensor,
    *,
    tol: float | None = None,
    maxiter: int,
    M: Callable[[Tensor], Tensor] | None = None,
    reorthogonalize: bool = True,
    **deprecated,
) -> Callable[[float], SubproblemResult]:
    r"""``radius -> SubproblemResult`` by Steihaug-Toint CG, solved once and then re-cut.

    The first call runs :func:`~second.newton.steihaug_cg`; later calls (a smaller radius
    after a rejected step) cut its stored path at the new radius, with no products.

    Args:
        hvp: ``v -> H v`` on flat vectors.
        g: the flat gradient.
        tol: relative CG tolerance (the forcing term; required).
        maxiter: CG iterations.
        M: optional preconditioner :math:`M \approx H^{-1}`.
        reorthogonalize: re-orthogonalize CG's residuals (default ``True``).
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        The subproblem solver for :func:`trust_region_step`.

    Example:
        >>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> solve = cg_subproblem(lambda v: H @ v, torch.ones(2, dtype=torch.float64), tol=1e-12, maxiter=5)
        >>> solve(10.0).step.tolist(), solve(0.5).matvecs
        ([-1.0, -0.25], 0)
    """
    if deprecated or tol is None:
        tol = renamed_keyword("cg_subproblem", deprecated, "rtol", "tol", tol)
    last: list[SubproblemResult] = []

    def solve(radius: float) -> SubproblemResult:
        if not last:
            last.append(
                steihaug_cg(
                    hvp, g, radius, tol=tol, maxiter=maxiter, M=M, reorthogonalize=reorthogonalize
                )
            )
        elif last[0].path is not None:
            last[0] = last[0].path.cut(radius)
        return last[0]

    return solve


def more_damping_update(
    damping: float, rho: float, *, shrink: float = 0.25, grow: float | None = None
) -> float:
    r"""The Levenberg-Marquardt damping as Moré's (1978) trust-region rule reads it.

    Moré halves (or more) the region on a poor step and doubles it on a very good one, and
    a smaller region is a larger damping: :math:`\lambda \leftarrow \text{grow}\,\lambda`
    when :math:`\rho < 1/4` (also for a NaN :math:`\rho`), :math:`\lambda \leftarrow
    \text{shrink}\,\lambda` when :math:`\rho > 3/4`, unchanged in between. Martens'
    Hessian-free rule is the same with ``shrink=2/3, grow=3/2``
    (:class:`~second.optim.HessianFree`).

    Args:
        damping: :math:`\lambda`.
        rho: actual / predicted reduction (``-inf`` for a failed trial).
        shrink: the factor on a very good step (default 1/4, i.e. the radius halved for a
            quadratic model).
        grow: the factor on a poor step (default ``1 / shrink``).

    Returns:
        The new damping.

    Example:
        >>> more_damping_update(1.0, -1.0), more_damping_update(1.0, 0.9), more_damping_update(1.0, 0.5)
        (4.0, 0.25, 1.0)
        >>> more_damping_update(1.0, 0.1, shrink=2 / 3, grow=1.5)
        1.5
    """
    if not rho >= 0.25:  # also catches NaN
        return damping * (1.0 / shrink if grow is None else grow)
    if rho > 0.75:
        return damping * shrink
    return damping


def damped_solve(
    g: Tensor,
    damping: float,
    *,
    eig: tuple[Tensor, Tensor] | None = None,
    gvp: Callable[[Tensor], Tensor] | None = None,
    maxiter: int = 250,
    tol: float = 1e-10,
    reorthogonalize: bool = True,
    **deprecated,
) -> tuple[Tensor, float]:
    r"""The damped Gauss-Newton step and the reduction its undamped model predicts.

    .. math:: p = -(G + \lambda I)^{-1} g, \qquad
              \text{pred} = -(g^\top p + \tfrac12 p^\top G p),

    from an eigendecomposition ``eig = (values, vectors)`` of :math:`G` (negative values,
    rounding, clipped to 0) or by CG on products ``gvp`` (:func:`~second.newton.model_cg`).

    Args:
        g: the flat gradient.
        damping: :math:`\lambda \ge 0`.
        eig: :math:`G`'s eigendecomposition (dense).
        gvp: ``v -> G v`` (matrix-free; used when ``eig`` is ``None``).
        maxiter: CG iterations (default 250).
        tol: relative CG tolerance (default 1e-10).
        reorthogonalize: re-orthogonalize CG's residuals (default ``True``).
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        ``(p, pred)``.

    Raises:
        ValueError: neither ``eig`` nor ``gvp``.

    Example:
        >>> G = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)); g = torch.ones(2, dtype=torch.float64)
        >>> p, pred = damped_solve(g, 1.0, eig=torch.linalg.eigh(G))
        >>> p.tolist(), damped_solve(g, 1.0, gvp=lambda v: G @ v)[0].allclose(p)
        ([-0.5, -0.25], True)
    """
    if deprecated:
        tol = renamed_keyword("damped_solve", deprecated, "rtol", "tol", tol, 1e-10)
    if eig is not None:
        ev, Q = eig
        ev = ev.clamp_min(0)
        c = Q.T @ g.to(Q.dtype)
        w = -c / (ev + damping)
        return (Q @ w).to(g.dtype), -float(c @ w + 0.5 * (ev * w * w).sum())
    if gvp is None:
        raise ValueError("damped_solve needs eig (dense) or gvp (matrix-free)")
    res = model_cg(
        lambda v: gvp(v) + damping * v,
        g,
        maxiter=maxiter,
        tol=tol,
        reorthogonalize=reorthogonalize,
    )
    # phi = g.p + p.(G + lam I)p / 2, so the undamped model is phi - lam ||p||^2 / 2
    return res.x, -(res.phi - 0.5 * damping * float(torch.dot(res.x, res.x)))


def damped_step(
    f: float,
    g: Tensor,
    damping: float,
    solve: Callable[[float], tuple[Tensor, float]],
    trial: Trial,
    *,
    nu: float = 2.0,
    rule: str = "nielsen",
    eta: float = 1e-4,
    min_damping: float = 1e-12,
    max_damping: float = 1e12,
) -> StepResult:
    r"""One Levenberg-Marquardt attempt: a damped solve, a trial, a damping update.

    .. math:: p = -(G + \lambda I)^{-1} g, \qquad
              \rho = \frac{f(x) - f(x + p)}{-(g^\top p + \tfrac12 p^\top G p)},

    accepted when :math:`\rho > \eta`; :math:`\lambda` follows Nielsen's rule
    (:func:`~second.newton.lm_damping_update`, ``rule="nielsen"``) or Moré's
    (:func:`more_damping_update`, ``rule="more"``), clipped to
    ``[min_damping, max_damping]``.

    Args:
        f: the objective at the current point.
        g: its flat gradient.
        damping: :math:`\lambda`.
        solve: ``damping -> (p, predicted reduction of the undamped model)``.
        trial: ``p -> (f(x + p), finish)``.
        nu: Nielsen's growth factor (default 2).
        rule: ``"nielsen"`` (default) or ``"more"``.
        eta: acceptance threshold (default 1e-4).
        min_damping: floor (default 1e-12).
        max_damping: ceiling (default 1e12).

    Returns:
        A :class:`StepResult` with the updated ``damping`` and ``nu``.

    Raises:
        ValueError: an unknown rule.

    Example:
        >>> g = torch.tensor([2.0], dtype=torch.float64)
        >>> def solve(lam):  # f(x) = (1 + x)^2 + 1 at x = 0: G = 2
        ...     p = -g / (2 + lam)
        ...     return p, -float(g @ p + p @ p)
        >>> r = damped_step(2.0, g, 1e-8, solve, lambda p: (float((1 + p) ** 2 + 1), None))
        >>> r.accepted, round(r.f, 6), r.damping < 1e-8
        (True, 1.0, True)
    """
    if rule not in DAMPING_RULES:
        raise ValueError(f"rule must be one of {DAMPING_RULES}, got {rule!r}")
    p, pred = solve(damping)
    if not pred > 0:
        return StepResult(False, p, math.nan, pred, math.nan, damping=damping, nu=nu)
    f_try, finish = trial(p)
    rho, g_try, prod = _ratio(f, g, p, pred, f_try, finish)
    accepted = rho > eta
    # a rejected step counts as a poor one under either rule (with eta above 1/4 a rejected
    # step with 1/4 <= rho <= eta left Moré's damping as it was, and the step was tried again)
    if rule == "nielsen":
        lam, nu = lm_damping_update(damping, nu, rho if accepted else -1.0)
    else:
        lam = more_damping_update(damping, rho if accepted else -1.0)
    lam = min(max(lam, min_damping), max_damping)
    return StepResult(accepted, p, rho, pred, f_try, finish, g_try, prod, damping=lam, nu=nu)
