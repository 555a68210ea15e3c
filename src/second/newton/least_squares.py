r"""Gauss-Newton / Levenberg-Marquardt for least squares in residual form, on the Newton core.

The objective is :math:`f(x) = \tfrac12\|r(x)\|^2` for a residual vector :math:`r`, or a
loss of an output, ``(loss, output)``; the curvature is the generalized Gauss-Newton
matrix :math:`G = J^\top (\nabla^2_{\mathrm{out}} \mathrm{loss}) J` (:math:`J^\top J` for
residuals), positive semi-definite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import GGNGraph
from .direction import model_minimizer_within
from .objective import NO_GRAPH, RayTest, finish, gradient_or_raise, record_and_check
from .result import OptimizeResult
from .steps import DAMPING_RULES, cg_subproblem, damped_solve, damped_step, trust_region_step
from .stopping import Criteria, safe_norm
from .trust_region import exact_trust_region

__all__ = ["gauss_newton", "LeastSquaresObjective", "DENSE_GGN_MAX"]

#: ``solver="auto"`` forms :math:`G` densely up to this many unknowns, CG on products above.
DENSE_GGN_MAX = 500


class LeastSquaresObjective:
    r"""``fun`` in residual or ``(loss, output)`` form, with counters and GGN products.

    Args:
        fun: ``x -> r(x)`` (a vector; :math:`f = \tfrac12\|r\|^2`) or ``x -> (loss, output)``.
        shape: the shape ``fun`` expects.

    Example:
        >>> obj = LeastSquaresObjective(lambda x: x - 3.0, (2,))
        >>> pt = obj.point(torch.zeros(2, dtype=torch.float64))
        >>> pt.f, pt.g.tolist(), obj.dense(pt).tolist()
        (9.0, [-3.0, -3.0], [[1.0, 0.0], [0.0, 1.0]])
    """

    class Point:
        """The objective at one point: ``f``, the flat gradient ``g`` and the GGN graph."""

        def __init__(self, f: float, loss: Tensor, out: Tensor, xr: Tensor):
            self.f, self.loss, self.out, self.xr = f, loss, out, xr
            self.g: Tensor | None = None
            self.graph: GGNGraph | None = None

    def __init__(self, fun: Callable, shape: tuple):
        self.fun, self.shape = fun, tuple(shape)
        self.nfev = self.ngev = self.matvecs = 0

    def evaluate(self, x: Tensor) -> LeastSquaresObjective.Point:
        """``f(x)`` with the forward graph kept (no gradient yet)."""
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.fun(xr.reshape(self.shape))
            if isinstance(out, (tuple, list)) and len(out) == 2:
                loss, output = out
            elif isinstance(out, Tensor) and out.dim() > 0:
                loss, output = 0.5 * (out * out).sum(), out
            else:
                raise ValueError(
                    "method 'gauss-newton' needs fun(x) to return a residual vector or a "
                    "(loss, output) pair; for a scalar objective use 'newton-cg'"
                )
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "method 'gauss-newton' needs the loss of a (loss, output) pair to be a "
                    "scalar tensor"
                )
            loss = loss.reshape(())
        self.nfev += 1
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError(NO_GRAPH)
        return self.Point(float(loss.detach()), loss, output, xr)

    def value(self, x: Tensor) -> float:
        """``f(x)`` without a graph."""
        with torch.no_grad():
            return self.evaluate(x).f

    def point(self, x: Tensor) -> LeastSquaresObjective.Point:
        """``evaluate`` and :meth:`finish`."""
        return self.finish(self.evaluate(x))

    def finish(self, pt: LeastSquaresObjective.Point) -> LeastSquaresObjective.Point:
        """Add the gradient and the GGN graph to an evaluated point (once)."""
        if pt.g is None:
            with torch.enable_grad():
                g = gradient_or_raise(pt.loss, pt.xr, retain_graph=True)
                pt.graph = GGNGraph(pt.loss, pt.out, [pt.xr])
            pt.g = g.detach().reshape(-1)
            self.ngev += 1
        return pt

    def gvp(self, pt: LeastSquaresObjective.Point, v: Tensor) -> Tensor:
        """:math:`G v` on flat vectors."""
        self.matvecs += 1
        if pt.graph is None:
            return torch.zeros_like(v)
        with torch.enable_grad():
            (out,) = pt.graph.gvp([v.reshape(pt.xr.shape)])
        return out.detach().reshape(-1)

    def dense(self, pt: LeastSquaresObjective.Point) -> Tensor:
        """:math:`G` as a dense matrix (``n`` batched products)."""
        n = pt.xr.numel()
        self.matvecs += n
        if pt.graph is None:
            return torch.zeros(n, n, dtype=pt.xr.dtype, device=pt.xr.device)
        eye = torch.eye(n, dtype=pt.xr.dtype, device=pt.xr.device)
        with torch.enable_grad():
            (cols,) = pt.graph.gvp([eye.reshape(n, *pt.xr.shape)], batched=True)
        G = cols.detach().reshape(n, n)
        return 0.5 * (G + G.T)


def gauss_newton(
    fun: Callable,
    x0: Tensor,
    criteria: Criteria,
    *,
    damping_rule: str = "more",
    solver: str = "auto",
    damping: float = 1e-3,
    initial_radius: float | None = None,
    eta: float = 1e-4,
    cg_maxiter: int | None = None,
    min_damping: float = 1e-15,
    max_damping: float = 1e15,
    reorthogonalize: bool = True,
) -> OptimizeResult:
    r"""Gauss-Newton with Levenberg-Marquardt globalization, dense or matrix-free.

    Each iteration minimizes the Gauss-Newton model
    :math:`m(p) = f + g^\top p + \tfrac12 p^\top G p`:

    * ``damping_rule="more"`` (default): in the trust region :math:`\|p\| \le \Delta`
      (Moré 1978, as in MINPACK's ``lmder``): the step is :math:`-(G + \lambda I)^{-1} g`
      with the smallest :math:`\lambda \ge 0` that keeps it in the region
      (:func:`~second.newton.exact_trust_region` on the dense :math:`G`, or Steihaug CG on
      products), and :math:`\Delta` follows the reduction ratio
      (:func:`~second.newton.trust_region_step`);
    * ``damping_rule="nielsen"``: :math:`p = -(G + \lambda I)^{-1} g` with Nielsen's (1999)
      update of :math:`\lambda` (:func:`~second.newton.damped_step`).

    ``solver="dense"`` forms :math:`G` (``n`` batched products, once per point: a rejected
    step is re-solved from its eigendecomposition at no cost); ``"cg"`` runs CG on
    products :math:`Gv = J^\top (\nabla^2 \mathrm{loss}) J v` (two backward passes each) to
    the forcing tolerance :math:`\min(1/2, \sqrt{\|g\|})`; ``"auto"`` is dense up to
    :data:`DENSE_GGN_MAX` unknowns. Zero-residual problems converge quadratically, small
    residuals fast linearly; large residuals linearly (Gauss-Newton's limit: use
    ``newton-cg`` when :math:`\sum_i r_i \nabla^2 r_i` dominates).

    Args:
        fun: ``x -> r(x)`` (a residual vector) or ``x -> (loss, output)``.
        x0: starting point.
        criteria: the stopping rules (gradient norm of :math:`f`, limits, unbounded).
        damping_rule: ``"more"`` (default) or ``"nielsen"``.
        solver: ``"auto"`` (default), ``"dense"`` or ``"cg"``.
        damping: initial :math:`\lambda` (``"nielsen"``; default 1e-3).
        initial_radius: :math:`\Delta_0` (``"more"``; default ``max(1, ||x0||)``).
        eta: acceptance threshold on :math:`\rho` (default 1e-4).
        cg_maxiter: CG iterations per solve (default ``max(20, min(n, 250))``).
        min_damping: floor for :math:`\lambda` (default 1e-15).
        max_damping: ceiling; reaching it stops the run as stalled (default 1e15).
        reorthogonalize: re-orthogonalize the CG residuals of the matrix-free solves
            (:class:`~second.newton.ResidualBasis`, default ``True``).

    Returns:
        An :class:`~second.newton.OptimizeResult` with ``method="gauss-newton"``.

    Raises:
        ValueError: an unknown rule or solver, or ``fun`` of the wrong form.

    Example:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-1.5 * t)
        >>> res = gauss_newton(lambda x: x[0] * torch.exp(-x[1] * t) - y,
        ...                    torch.ones(2, dtype=torch.float64), Criteria(gtol=1e-12, maxiter=50))
        >>> res.converged, [round(v, 8) for v in res.x.tolist()]
        (True, [2.0, 1.5])
    """
    if damping_rule not in DAMPING_RULES:
        raise ValueError(f"damping_rule must be one of {DAMPING_RULES}, got {damping_rule!r}")
    if solver not in ("auto", "dense", "cg"):
        raise ValueError(f"solver must be 'auto', 'dense' or 'cg', got {solver!r}")
    t0 = time.perf_counter()
    shape = x0.shape
    x = x0.detach().reshape(-1).clone()
    n = x.numel()
    dense = solver == "dense" or (solver == "auto" and n <= DENSE_GGN_MAX)
    cg_maxiter = cg_maxiter or max(20, min(n, 250))
    obj = LeastSquaresObjective(fun, shape)
    pt = obj.point(x)
    history: list[dict] = []
    xnorms = [safe_norm(x)]
    fvals = [pt.f]
    ray = RayTest(obj.value, criteria, x, pt.f)
    radius = float(initial_radius) if initial_radius is not None else max(1.0, xnorms[0])
    lam, nu = float(damping), 2.0
    it, reason, extra = 0, None, ""
    while True:
        f, g = pt.f, pt.g
        gnorm = safe_norm(g)
        reason = record_and_check(
            obj, criteria, history, it, f, gnorm, radius, xnorms, fvals, ray,
            near=lambda pt=pt, g=g: model_minimizer_within(
                lambda v: obj.gvp(pt, v), g, xnorms[-1], maxiter=min(2 * n, 200)
            ),
        )  # fmt: skip
        history[-1]["damping"] = lam
        if reason is not None:
            break
        tol = max(min(0.5, math.sqrt(gnorm)), 0.5 * criteria.gtol / gnorm)
        eig = None
        if dense:
            G = obj.dense(pt)
            if damping_rule == "nielsen":
                eig = torch.linalg.eigh(G.to(torch.float64))

            def subproblem(r, G=G, g=g):
                return exact_trust_region(G, g, r)
        else:
            subproblem = cg_subproblem(
                lambda v, pt=pt: obj.gvp(pt, v),
                g,
                tol=tol,
                maxiter=cg_maxiter,
                reorthogonalize=reorthogonalize,
            )

        def solve(lam_, pt=pt, g=g, eig=eig, tol=tol):
            return damped_solve(
                g,
                lam_,
                eig=eig,
                gvp=lambda v: obj.gvp(pt, v),
                maxiter=cg_maxiter,
                tol=tol,
                reorthogonalize=reorthogonalize,
            )

        trials: dict = {}

        def trial(p, x=x, trials=trials):
            trials["pt"] = obj.evaluate(x + p)
            return trials["pt"].f, (lambda graph=True: _grad_of(obj, trials["pt"]))

        while True:
            it += 1
            if damping_rule == "more":
                res = trust_region_step(f, g, radius, subproblem, trial, eta=eta)
            else:
                res = damped_step(
                    f,
                    g,
                    lam,
                    solve,
                    trial,
                    nu=nu,
                    rule="nielsen",
                    eta=eta,
                    min_damping=min_damping,
                    max_damping=max_damping,
                )
                lam, nu = res.damping, res.nu
            if not res.predicted_reduction > 0:
                reason, extra = "stalled", "stalled: the Gauss-Newton model predicts no decrease"
                break
            if damping_rule == "more":
                radius = res.radius
            if res.accepted:
                break
            if damping_rule == "nielsen" and lam >= max_damping:
                reason, extra = "stalled", "stalled: damping reached max_damping"
                break
            stop = criteria.rejected(it, radius if damping_rule == "more" else None, xnorms[-1])
            if stop is not None:
                reason, extra = stop
                break
        if reason is not None:
            break
        x = x + res.step
        pt = obj.finish(trials["pt"])
        xnorms.append(safe_norm(x))
        fvals.append(pt.f)
        ray.accept(x, pt.f)
        snorm = safe_norm(res.step)
        if (
            math.isfinite(xnorms[-1])
            and snorm <= criteria.xtol * (1 + xnorms[-1])
            and safe_norm(pt.g) > criteria.gtol
        ):
            reason, extra = "stalled", f"stalled: step norm {snorm:.3e} below xtol"
            break
    gnorm = safe_norm(pt.g)
    return finish(
        obj, x, pt.f, gnorm, it, reason, criteria, "gauss-newton", history, t0, xnorms, shape, extra
    )


def _grad_of(obj: LeastSquaresObjective, pt: LeastSquaresObjective.Point):
    obj.finish(pt)
    return pt.g, None
