r"""The Newton core's loops: matrix-free Newton-CG and dense Newton, as pure functions.

Newton-CG is globalized by a trust region or a strong-Wolfe line search.

Every loop evaluates ``fun`` through one :class:`~second.newton.objective.Objective` (which
counts evaluations and products), asks :class:`~second.newton.stopping.Criteria` whether to
stop, and returns an :class:`~second.newton.result.OptimizeResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import hvp_from_gradient
from .direction import forcing_term, model_minimizer_within, truncated_cg
from .globalize import strong_wolfe
from .objective import MESSAGES, Objective, RayTest, finish, record_and_check
from .precond import LBFGSPreconditioner
from .result import OptimizeResult
from .steps import NOISE, cg_subproblem, trust_region_step
from .stopping import Criteria, safe_norm
from .trust_region import RCOND, SubproblemResult, exact_trust_region

__all__ = [
    "Objective",
    "newton_cg",
    "newton_dense",
    "dense_hessian",
    "DENSE_CHUNK",
    "REUSE_TOL",
    "MESSAGES",
    "RayTest",
]

_NOISE = NOISE  # |f| times this: a change of f below it is mostly rounding (float64)


def newton_cg(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor,
    criteria: Criteria,
    *,
    globalization: str = "trust-region",
    preconditioner: str | Callable[[Tensor], Tensor] | None = "lbfgs",
    memory: int = 10,
    cg_maxiter: int | None = None,
    forcing: str | float = "eisenstat-walker",
    initial_radius: float = 1.0,
    max_radius: float = 1e10,
    eta: float = 0.1,
    warm_start: bool = True,
    max_matvecs: int | None = None,
    reorthogonalize: bool = True,
) -> OptimizeResult:
    r"""Matrix-free Newton-CG: truncated CG on Hessian-vector products, globalized.

    Each iteration solves :math:`H d = -g` by CG to the forcing tolerance
    :math:`\|Hd + g\| \le \eta_k\|g\|` (:func:`~second.newton.forcing_term`, or a fixed
    ``forcing``), preconditioned by an L-BFGS approximation of :math:`H^{-1}` built from the
    accepted steps (:class:`~second.newton.LBFGSPreconditioner`), then:

    * ``globalization="trust-region"`` (default): Steihaug-Toint CG in the region
      :math:`\|p\|_{M^{-1}} \le \Delta` (negative curvature is followed to the boundary), the
      step accepted when :math:`\rho > \eta` and the radius updated from :math:`\rho`
      (:func:`~second.newton.update_radius`); a rejected step is re-cut from the stored CG path
      at no product cost.
    * ``globalization="line-search"``: CG warm-started from the previous step; a direction of
      negative curvature met by CG is added to the CG iterate (scaled to its length, signed
      downhill), and a strong-Wolfe line search (:func:`~second.newton.strong_wolfe`) from
      :math:`t = 1` sets the length. A failed line search ends the run (status
      ``"line_search"``).

    Stopping: :class:`~second.newton.Criteria` (gradient norm, unbounded iterates, limits),
    or a radius / step below ``criteria.xtol`` (status ``"stalled"``).

    Args:
        fun: ``x -> scalar tensor``.
        x0: the starting point (any shape).
        criteria: the stopping rules.
        globalization: ``"trust-region"`` or ``"line-search"``.
        preconditioner: ``"lbfgs"`` (default), ``None``, or a callable ``r -> M r``.
        memory: L-BFGS pairs (default 10).
        cg_maxiter: CG iterations per direction (default ``max(50, 10 n)``, capped at 10,000).
        forcing: ``"eisenstat-walker"`` or a fixed relative tolerance.
        initial_radius: :math:`\Delta_0` (default 1).
        max_radius: largest radius (default 1e10).
        eta: acceptance threshold on :math:`\rho` (default 0.1).
        warm_start: warm-start CG from the previous step (line search only).
        max_matvecs: stop (status ``"matvecs"``) before a direction whose CG would go past
            this many Hessian-vector products in all (``second.minimize``'s ``"auto"`` then
            runs dense Newton); default none.
        reorthogonalize: re-orthogonalize CG's residuals within
            :data:`~second.newton.REORTH_MEMORY` (default ``True``; a quadratic of condition
            1e8 in 100 unknowns: 1,274 products instead of 14,769).

    Returns:
        An :class:`~second.newton.OptimizeResult`.

    Raises:
        ValueError: an unknown globalization or preconditioner.

    Example:
        >>> A = torch.diag(torch.logspace(0, 8, 20, dtype=torch.float64))
        >>> res = newton_cg(lambda x: 0.5 * x @ A @ x - x.sum(), torch.zeros(20, dtype=torch.float64),
        ...                 Criteria(gtol=1e-8, maxiter=100))
        >>> res.converged
        True
    """
    if globalization not in ("trust-region", "line-search"):
        raise ValueError(
            f"globalization must be 'trust-region' or 'line-search', got {globalization!r}"
        )
    t0 = time.perf_counter()
    shape = x0.shape
    x = x0.detach().reshape(-1).clone()
    n = x.numel()
    cg_maxiter = cg_maxiter or min(max(50, 10 * n), 10_000)
    if preconditioner == "lbfgs":
        precond = LBFGSPreconditioner(memory)
    elif preconditioner is None or callable(preconditioner):
        precond = preconditioner
    else:
        raise ValueError(
            f"preconditioner must be 'lbfgs', None or a callable, got {preconditioner!r}"
        )
    method = "newton-cg" if globalization == "trust-region" else "newton-cg-ls"
    obj = Objective(fun, shape, method)
    f, g, hvp = obj.value_grad(x, graph=True)
    f_search = f_search_next = f
    history: list[dict] = []
    xnorms = [_norm(x)]
    fvals = [f]
    ray = RayTest(obj.value, criteria, x, f)
    radius = float(initial_radius)
    gnorm_prev = eta_prev = None
    d_prev = None
    interior = globalization == "line-search"
    it = 0
    reason, extra = None, ""
    while True:
        gnorm = _norm(g)
        reason = record_and_check(
            obj, criteria, history, it, f, gnorm, radius, xnorms, fvals, ray,
            near=lambda hvp=hvp, g=g: model_minimizer_within(
                hvp, g, xnorms[-1], maxiter=min(2 * n, 200)
            ),
        )  # fmt: skip
        if reason is not None:
            break
        if isinstance(forcing, str):
            tol = forcing_term(gnorm, gnorm_prev, eta_prev)
        else:
            tol = float(forcing)
        tol = max(tol, 0.5 * criteria.gtol / gnorm)  # no need to solve below gtol
        gnorm_prev, eta_prev = gnorm, tol
        M = precond
        if isinstance(precond, LBFGSPreconditioner) and (not len(precond) or not interior):
            # the quasi-Newton preconditioner reshapes the trust region (||p||_{M^-1}); it is
            # used once the last step was an interior (Newton) step, i.e. where the region
            # no longer binds
            M = None
        cap = cg_maxiter
        if max_matvecs is not None:
            cap = min(cg_maxiter, max_matvecs - obj.matvecs)
            if cap < 1:
                reason, extra = "matvecs", f"stopped: {obj.matvecs} products (max_matvecs)"
                break
        if globalization == "trust-region":
            subproblem = cg_subproblem(
                hvp, g, tol=tol, maxiter=cap, M=M, reorthogonalize=reorthogonalize
            )
            while True:
                it += 1
                try:
                    res = trust_region_step(
                        f, g, radius, subproblem, obj.trial_at(x), eta=eta, max_radius=max_radius
                    )
                except FloatingPointError as err:  # a product overflowed at x
                    reason, extra = "nonfinite", _overflow(err, f, xnorms[-1])
                    break
                if not res.predicted_reduction > 0:
                    reason, extra = "stalled", "stalled: the quadratic model predicts no decrease"
                    break
                radius = res.radius
                if res.accepted:
                    break
                stop = criteria.rejected(it, radius, xnorms[-1])
                if stop is not None:
                    reason, extra = stop
                    break
            if reason is not None:
                break
            step, f_try = res.step, res.f
            interior = not res.sub.on_boundary
            g_try, hvp_try = (res.grad, res.product) if res.grad is not None else res.finish(True)
        else:
            x0cg = d_prev if (warm_start and d_prev is not None) else None
            try:
                d, info = truncated_cg(
                    hvp, g, tol=tol, maxiter=cap, M=M, x0=x0cg, reorthogonalize=reorthogonalize
                )
            except FloatingPointError as err:  # a product overflowed at x
                reason, extra = "nonfinite", _overflow(err, f, xnorms[-1])
                break
            if info.negative_curvature is not None and info.iterations > 1:
                d = d + float(torch.linalg.vector_norm(d)) * info.negative_curvature
            slope = float(torch.dot(g, d))
            if not slope < 0:
                d, slope = -g, -gnorm * gnorm
            it += 1
            cache = {}

            def phi(t, x=x, d=d, cache=cache, f0=f_search, slope0=slope):
                ft, gt, hv = obj.value_grad(x + t * d, graph=True)
                cache[t] = (gt, hv, ft)  # the value itself, for the records and the result
                dt = float(torch.dot(gt, d))
                if math.isfinite(ft) and abs(ft - f0) <= _NOISE * max(abs(f0), abs(ft)):
                    ft = f0 + 0.5 * t * (slope0 + dt)  # below f's rounding: trapezoidal rule
                return ft, dt, None

            ls = strong_wolfe(phi, f_search, slope, t0=1.0)
            if ls.t == 0.0:
                reason, extra = "line_search", f"line search failed: {ls.message}"
                break
            step = ls.t * d
            g_try, hvp_try, f_try = cache[ls.t]
            f_search_next = ls.f
            d_prev = step
        if isinstance(precond, LBFGSPreconditioner):
            # both are new tensors that nothing changes later: the pair keeps them uncopied
            precond._update(step, g_try - g, copy=False)
        snorm = _norm(step)
        x = x + step
        f, g, hvp = f_try, g_try, hvp_try
        # the line search compares values below f's rounding by the trapezoidal rule and goes
        # on from its own estimate (a chain that stays consistent with the gradients, so that
        # gradients that contradict the values end in a failed search); the records, the
        # unbounded test and the result take f itself
        f_search = f_search_next if globalization == "line-search" else f
        xnorms.append(_norm(x))
        fvals.append(f)
        ray.accept(x, f)
        if _stalled(snorm, xnorms[-1], g, criteria):
            reason, extra = "stalled", f"stalled: step norm {snorm:.3e} below xtol"
            break
    gnorm = _norm(g)
    return finish(obj, x, f, gnorm, it, reason, criteria, method, history, t0, xnorms, shape, extra)


#: Hessian columns formed per batched pass by :func:`dense_hessian` (bounds the memory of the
#: batched pass). Measured on one thread, median of 7: Rosenbrock-100 0.9 / 0.5 / 0.3 ms at
#: 32 / 64 / 128 columns a pass, the teacher-student MLP 8-32-1 (321 columns, 400 points)
#: 52-84 ms whatever the chunk on a quiet machine (113 against 40 ms for one pass against passes
#: of 32 on a loaded one).
DENSE_CHUNK = 128

#: :func:`newton_dense` keeps its Hessian (and its eigendecomposition) for the next step while
#: it predicted the change of the gradient over the last accepted step to this relative
#: accuracy, ``||g_new - g - H s|| <= REUSE_TOL * ||g_new - g||``: a Newton step on that
#: Hessian then lowers ``||g||`` by about this factor at the cost of one gradient instead of
#: ``n`` products and an eigendecomposition (on a quadratic the Hessian is formed once; near a
#: solution of a smooth problem the ratio falls like the step). A step that the reused Hessian
#: gets rejected, or one that predicts the gradient worse, forms it again.
REUSE_TOL = 1e-2


def dense_hessian(g: Tensor, xr: Tensor, eye: Tensor | None = None) -> Tensor:
    r"""The dense Hessian :math:`\nabla^2 f` from a gradient ``g`` with its graph, by columns.

    ``n`` Hessian-vector products batched :data:`DENSE_CHUNK` columns at a time.

    Args:
        g: the flat gradient, built with ``create_graph=True`` with respect to ``xr``.
        xr: the flat point.
        eye: the identity (default: built here).

    Returns:
        The ``n x n`` matrix (zeros when ``g`` has no graph: ``f`` is linear).

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
        >>> dense_hessian(g, x).tolist()
        [[6.0, 0.0], [0.0, 12.0]]
    """
    n = xr.numel()
    if not g.requires_grad:
        return torch.zeros(n, n, dtype=xr.dtype, device=xr.device)
    eye = torch.eye(n, dtype=xr.dtype, device=xr.device) if eye is None else eye
    with torch.enable_grad():
        cols = [
            hvp_from_gradient([g], [xr], [eye[i : i + DENSE_CHUNK]], batched=True)[0]
            for i in range(0, n, DENSE_CHUNK)
        ]
    return torch.cat(cols).detach()


def newton_dense(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor,
    criteria: Criteria,
    *,
    initial_radius: float = 1.0,
    eta: float = 0.1,
    hessian_every: int = 1,
    reuse_tol: float = REUSE_TOL,
    rcond: float = RCOND,
    negligible: float = 0.5,
) -> OptimizeResult:
    r"""Dense trust-region Newton: the exact subproblem on the dense Hessian (small problems).

    Each iteration forms :math:`H` (``n`` batched products) and solves the trust-region
    subproblem exactly (:func:`~second.newton.exact_trust_region`): the step is
    :math:`-(H + \mu I)^{-1} g` with the smallest shift :math:`\mu \ge \max(0, -\lambda_1)`
    that keeps it in the region, i.e. an eigenvalue modification of an indefinite Hessian
    chosen by the region. ``hessian_every=m`` reuses :math:`H` for up to ``m`` accepted steps
    (a step rejected with a reused Hessian refreshes it); beyond that, :math:`H` is kept while
    it predicts the change of the gradient over the last step to ``reuse_tol`` (see
    :data:`REUSE_TOL`).

    Rounding: eigenvalues within ``rcond`` of the largest magnitude are unresolved; the
    subproblem shifts by at least that much, and the gradient's components along them are
    dropped while their joint norm is at most ``negligible * gtol`` (see
    :func:`~second.newton.exact_trust_region`). Without that rule, on a network whose
    parameters have a (near-)symmetry or a minimizer at infinity, every step walked along
    such a direction on a slope of ~1e-11, rebuilt the gradient elsewhere by the nonlinearity,
    and the run crept (teacher-student 4-8-1: 6,144 iterations instead of 435; see
    BENCHMARKS.md).

    Args:
        fun: ``x -> scalar tensor``.
        x0: starting point.
        criteria: the stopping rules.
        initial_radius: :math:`\Delta_0` (default 1).
        eta: acceptance threshold on :math:`\rho` (default 0.1).
        hessian_every: Hessian reuse (default 1: every iteration).
        reuse_tol: the relative error of the gradient's change, as :math:`H` predicts it,
            up to which :math:`H` is kept for the next step (default :data:`REUSE_TOL`; 0
            forms it whenever ``hessian_every`` says).
        rcond: the relative eigenvalue rounding level (default
            :data:`~second.newton.RCOND`).
        negligible: the share of ``gtol`` below which a slope along unresolved directions is
            dropped (default 0.5; 0 keeps every slope).

    Returns:
        An :class:`~second.newton.OptimizeResult` (method ``"newton-exact"``).

    Example:
        >>> res = newton_dense(lambda x: ((x - 1) ** 4).sum() + (x**2).sum(),
        ...                    torch.zeros(3, dtype=torch.float64), Criteria(gtol=1e-10, maxiter=50))
        >>> res.converged, res.matvecs // 3, res.ngev  # Hessians formed (3 products each), gradients
        (True, 4, 7)
    """
    t0 = time.perf_counter()
    shape = x0.shape
    x = x0.detach().reshape(-1).clone()
    n = x.numel()
    obj = Objective(fun, shape, "newton-exact")
    eye = torch.eye(n, dtype=x.dtype, device=x.device)

    f, _, _ = obj.value_grad(x, graph=True)
    assert obj.graph is not None
    g, xr = obj.graph
    radius = float(initial_radius)
    history: list[dict] = []
    xnorms = [safe_norm(x)]
    fvals = [f]
    ray = RayTest(obj.value, criteria, x, f)
    H, age, it, fresh = None, 0, 0, False
    eig: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))  # H's, once formed
    reason, extra = None, ""
    while True:
        gflat = g.detach()
        gnorm = safe_norm(gflat)

        def near(g=gflat, H=H, eig=eig) -> bool:
            # the Newton step of the last Hessian formed (this point's, or one that still
            # predicts its gradient), where that Hessian is positive definite
            if H is None or not float(eig[0][0]) > 0:
                return False
            lam, Q = eig
            step = Q @ ((Q.T @ g.to(torch.float64)) / lam)
            return float(torch.linalg.vector_norm(step)) <= xnorms[-1]

        reason = record_and_check(
            obj, criteria, history, it, f, gnorm, radius, xnorms, fvals, ray, near=near
        )
        if reason is not None:
            break
        if H is None or age >= hessian_every:
            cols = dense_hessian(g, xr, eye)
            obj.matvecs += n
            H, age, fresh = cols.detach(), 0, True
            if not bool(torch.isfinite(H).all()):  # as Newton-CG's overflowing product
                err = FloatingPointError("the Hessian is not finite")
                reason, extra = "nonfinite", _overflow(err, f, xnorms[-1])
                break
            H64 = 0.5 * (H + H.T).to(torch.float64)
            eig = torch.linalg.eigh(H64)

        def subproblem(r: float, g=gflat, H64=H64, eig=eig) -> SubproblemResult:
            return exact_trust_region(
                H64, g, r, eig=eig, rcond=rcond, negligible=negligible * criteria.gtol
            )

        res, reform = None, False
        while True:
            it += 1
            before = radius
            # the shared step: rho by the trapezoidal rule where f's change is rounding
            res = trust_region_step(
                f, gflat, radius, subproblem, obj.trial_at(x), eta=eta, max_radius=math.inf
            )
            # a model that predicts no decrease (a zero step): shrink, as for a bad step
            radius = res.radius if res.predicted_reduction > 0 else 0.25 * res.sub.step_norm
            if res.accepted:
                break
            if not fresh:  # rejected with a Hessian from an earlier point: form it here,
                H, radius, reform = None, before, True  # and try the same region again
                break
            if radius <= criteria.xtol * (1 + xnorms[-1]) or it >= criteria.maxiter:
                break
        if reform:
            continue
        if radius <= criteria.xtol * (1 + xnorms[-1]):
            reason, extra = "stalled", f"stalled: trust radius {radius:.3e} below xtol"
            break
        if not res.accepted:
            continue  # the same point: a fresh Hessian, or the iteration limit next
        if res.grad is None:  # else the trapezoidal rule took this trial's gradient already
            res.finish(True)
        assert obj.graph is not None  # the accepted trial's: its gradient was taken last
        g_old, fresh = gflat, False
        x = x + res.step
        (g, xr), f = obj.graph, res.f
        xnorms.append(safe_norm(x))
        fvals.append(f)
        ray.accept(x, f)
        snorm = safe_norm(res.step)
        if _stalled(snorm, xnorms[-1], g.detach(), criteria):  # as Newton-CG: x no longer moves
            reason, extra = "stalled", f"stalled: step norm {snorm:.3e} below xtol"
            break
        if (
            age + 1 >= hessian_every
            and reuse_tol > 0
            and _predicts(H64, g_old, g, res.step, reuse_tol)
        ):
            age = 0  # the Hessian still predicts the gradient: keep it
        else:
            age += 1
    gnorm = safe_norm(g.detach())
    return finish(
        obj, x, f, gnorm, it, reason, criteria, "newton-exact", history, t0, xnorms, shape, extra
    )


def _norm(v: Tensor) -> float:
    """:func:`safe_norm` of a vector without a graph, its float64 case first (no extra calls)."""
    if v.dtype == torch.float64 and not v.requires_grad:
        n = float(torch.linalg.vector_norm(v))
        if 1e-140 < n < math.inf:  # as safe_norm: its squares neither overflowed nor underflowed
            return n
    return safe_norm(v)


def _overflow(err: Exception, f: float, xnorm: float) -> str:
    return f"{err} (f = {f:.6e}, ||x|| = {xnorm:.3e}): the curvature overflows there"


def _stalled(snorm: float, xnorm: float, g: Tensor, criteria: Criteria) -> bool:
    """An accepted step below ``xtol (1 + ||x||)`` with the gradient still above ``gtol``.

    Finite norms only: an overflowing ``||x||`` must not make every step look small.
    """
    return (
        math.isfinite(xnorm)
        and snorm <= criteria.xtol * (1 + xnorm)
        and safe_norm(g) > criteria.gtol
    )


def _predicts(H: Tensor, g_old: Tensor, g_new: Tensor, step: Tensor, tol: float) -> bool:
    """Whether ``g_old + H step`` is within ``tol`` of ``g_new`` relative to their change."""
    y = (g_new.detach() - g_old).to(H.dtype)
    err = y - H @ step.to(H.dtype)
    ynorm = float(torch.linalg.vector_norm(y))
    return ynorm > 0 and float(torch.linalg.vector_norm(err)) <= tol * ynorm
