r"""``second.minimize``: a SciPy-shaped functional entry point for small problems."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..func.products import hvp_from_gradient
from ._base import check_int, check_nonneg
from ._trust_region import exact_trust_region, update_radius
from .gauss_newton import GaussNewton
from .newton import NewtonCG

__all__ = ["minimize", "OptimizeResult", "METHODS"]

METHODS = ("newton-cg", "newton-exact", "dense", "gauss-newton", "lm")


@dataclass
class OptimizeResult:
    r"""What :func:`minimize` returns (SciPy's field names).

    Attributes:
        x: the solution (detached, shaped like ``x0``).
        fun: the objective at ``x``.
        grad_norm: :math:`\|\nabla f(x)\|_2`.
        nit: iterations.
        nfev: objective evaluations.
        ngev: gradient evaluations.
        nhvp: Hessian- (or Gauss-Newton-) vector products.
        success: whether the gradient tolerance was met.
        message: why it stopped.
        method: the method used.
        history: per-iteration records (``nfev, ngev, nhvp, loss, grad_norm``, ...).
        time: wall-clock seconds.
    """

    x: Tensor
    fun: float
    grad_norm: float
    nit: int
    nfev: int
    ngev: int
    nhvp: int
    success: bool
    message: str
    method: str
    history: list[dict] = field(default_factory=list, repr=False)
    time: float = 0.0

    @property
    def cost(self) -> int:
        """Gradient evaluations plus twice the curvature products (the benchmark's unit)."""
        return self.ngev + 2 * self.nhvp


def minimize(
    fun: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]],
    x0: Tensor,
    method: str = "newton-cg",
    *,
    tol: float = 1e-6,
    maxiter: int | None = None,
    max_time: float | None = None,
    options: dict | None = None,
) -> OptimizeResult:
    r"""Minimize a function of one tensor with a Newton-type method.

    Methods:
    * ``"newton-cg"``: trust-region Newton with Steihaug-CG on Hessian-vector products
      (:class:`~second.optim.NewtonCG`); ``fun(x)`` returns a scalar tensor.
    * ``"newton-exact"`` (alias ``"dense"``): trust-region Newton on the dense Hessian
      (``n`` batched products per iteration) with the exact subproblem solution
      (:func:`~second.optim.exact_trust_region`); for tiny problems. Option
      ``hessian_every=m`` reuses the Hessian for up to ``m`` accepted steps (a "lazy" Newton
      method: the trust region keeps it globally convergent; a step rejected with a reused
      Hessian refreshes it).
    * ``"gauss-newton"`` (alias ``"lm"``): Levenberg-Marquardt (:class:`~second.optim.GaussNewton`).
      ``fun(x)`` returns either a residual vector :math:`r(x)` (any non-scalar shape), and the
      objective is :math:`f = \tfrac12 \|r(x)\|^2` with Gauss-Newton matrix :math:`J^\top J`, or
      a pair ``(loss, output)``: a scalar loss computed from an intermediate ``output``, and
      the Gauss-Newton matrix :math:`J^\top (\nabla^2_{\mathrm{output}} \mathrm{loss})\, J`.

    Stopping rule: :math:`\|\nabla f(x)\|_2 \le` ``tol``, or ``maxiter`` iterations, or
    ``max_time`` seconds, or a stalled method (step or radius below 1e-12).

    Args:
        fun: the objective (see the methods for what it returns).
        x0: starting point (any shape; float64 recommended).
        method: one of ``"newton-cg"``, ``"newton-exact"``, ``"dense"``, ``"gauss-newton"``,
            ``"lm"``.
        tol: gradient-norm tolerance (default 1e-6).
        maxiter: iteration limit (default ``max(1000, 20 n)`` for ``n = x0.numel()``); when
            it stops the run, ``message`` says so and by how much the gradient fell.
        max_time: wall-clock limit in seconds (default none).
        options: extra keyword arguments for the optimizer (e.g. ``initial_radius``,
            ``damping``, ``solver``).

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        ValueError: an unknown method, bad tolerances, or a ``fun`` of the wrong form.

    Example:
        >>> def rosen(x):
        ...     return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), tol=1e-8)
        >>> res.success, torch.allclose(res.x, torch.ones(2, dtype=torch.float64))
        (True, True)
        >>> res = minimize(lambda x: x - 3.0, torch.zeros(2, dtype=torch.float64), method="lm")
        >>> res.success, torch.allclose(res.x, torch.full((2,), 3.0, dtype=torch.float64))
        (True, True)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_nonneg("tol", tol)
    if not isinstance(x0, Tensor):
        x0 = torch.as_tensor(x0, dtype=torch.get_default_dtype())
    maxiter = default_maxiter(x0.numel()) if maxiter is None else maxiter
    check_int("maxiter", maxiter, minimum=0)
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    options = dict(options or {})
    x = x0.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    if maxiter == 0:
        return _no_iteration(fun, x, x0, tol, method, t0)
    deadline = math.inf if max_time is None else t0 + max_time
    if method in ("newton-exact", "dense"):
        return _newton_exact(fun, x, tol, maxiter, deadline, t0, options)
    if method == "newton-cg":
        opt = NewtonCG([x], tolerance_grad=tol, **options)

        def closure():
            f = fun(x)
            if not isinstance(f, Tensor) or f.numel() != 1:
                raise ValueError("method 'newton-cg' needs fun(x) to return a scalar tensor")
            return f.reshape(())
    else:
        opt = GaussNewton([x], tolerance_grad=tol, **options)

        def closure():
            out = fun(x)
            if isinstance(out, (tuple, list)):
                return out
            if not isinstance(out, Tensor) or out.dim() == 0:
                raise ValueError(
                    "method 'gauss-newton' needs fun(x) to return a residual vector or a "
                    "(loss, output) pair; for a scalar objective use 'newton-cg'"
                )
            return 0.5 * (out * out).sum(), out

    st = None
    while True:
        opt.step(closure)
        st = opt._state
        if opt.stop_reason is not None or st["n_iter"] >= maxiter:
            break
        if time.perf_counter() > deadline:
            break
    reason = opt.stop_reason
    if reason is None:
        reason = (
            _limit_message(maxiter, st["history"])
            if st["n_iter"] >= maxiter
            else f"stopped: time limit ({max_time} s)"
        )
    fval, gval = float(st["loss"]), float(st["grad_norm"])
    success = opt.converged and math.isfinite(fval) and math.isfinite(gval)
    if opt.converged and not success:
        reason = f"the objective or its gradient is not finite (f = {fval}, ||grad|| = {gval})"
    return OptimizeResult(
        x=x.detach().reshape(x0.shape),
        fun=fval,
        grad_norm=gval,
        nit=st["n_iter"],
        nfev=st["nfev"],
        ngev=st["ngev"],
        nhvp=st["nhvp"],
        success=success,
        message=reason,
        method=method,
        history=list(st["history"]),
        time=time.perf_counter() - t0,
    )


def _no_iteration(fun, x, x0, tol, method, t0) -> OptimizeResult:
    """``maxiter=0``: evaluate at ``x0`` and report (SciPy returns a status, not an error)."""
    with torch.enable_grad():
        out = fun(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        f = out if out.numel() == 1 else 0.5 * (out * out).sum()
        (g,) = torch.autograd.grad(f.reshape(()), x)
    fval, gnorm = float(f.detach()), float(torch.linalg.vector_norm(g))
    success = math.isfinite(fval) and gnorm <= tol
    return OptimizeResult(
        x=x.detach().reshape(x0.shape),
        fun=fval,
        grad_norm=gnorm,
        nit=0,
        nfev=1,
        ngev=1,
        nhvp=0,
        success=success,
        message=(
            f"converged: ||grad|| = {gnorm:.3e} <= tol = {tol:.1e} at x0"
            if success
            else "stopped: iteration limit (0) reached before the tolerance"
        ),
        method=method,
        time=time.perf_counter() - t0,
    )


def default_maxiter(n: int) -> int:
    """The default iteration limit of :func:`minimize`: ``max(1000, 20 n)`` for ``n`` unknowns.

    Newton-type methods need more iterations on larger nonconvex problems (Rosenbrock in
    ``n`` dimensions walks its valley in ``O(n)`` steps), so a fixed limit stops big problems
    early.
    """
    return max(1000, 20 * int(n))


def _limit_message(maxiter: int, history: list[dict]) -> str:
    """Why the iteration limit stopped the run, and how far the gradient fell."""
    msg = f"stopped: iteration limit ({maxiter}) reached before the tolerance"
    if history:
        g0, g1 = history[0].get("grad_norm"), history[-1].get("grad_norm")
        if g0 and g1 is not None and math.isfinite(g0) and math.isfinite(g1):
            msg += f"; ||grad|| fell from {g0:.3e} to {g1:.3e} (factor {g0 / max(g1, 1e-300):.2e})"
    return msg + "; raise maxiter to continue"


def _newton_exact(fun, x, tol, maxiter, deadline, t0, options) -> OptimizeResult:
    radius = float(options.pop("initial_radius", 1.0))
    eta = float(options.pop("eta", 0.1))
    every = options.pop("hessian_every", 1)
    check_int("hessian_every", every)
    if options:
        raise ValueError(f"unknown options for 'newton-exact': {sorted(options)}")
    n = x.numel()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    counts = dict(nfev=0, ngev=0, nhvp=0, nit=0)
    history: list[dict] = []

    def evaluate():
        with torch.enable_grad():
            f = fun(x)
            if not isinstance(f, Tensor) or f.numel() != 1:
                raise ValueError("method 'newton-exact' needs fun(x) to return a scalar tensor")
            (g,) = torch.autograd.grad(f, x, create_graph=True)
        counts["nfev"] += 1
        counts["ngev"] += 1
        return f, g

    f, g = evaluate()
    message, success = None, False
    H, age = None, 0
    while True:
        gflat = g.detach().reshape(-1)
        gnorm = float(torch.linalg.vector_norm(gflat))
        fval = float(f.detach())
        history.append(
            dict(
                n_iter=counts["nit"],
                nfev=counts["nfev"],
                ngev=counts["ngev"],
                nhvp=counts["nhvp"],
                loss=fval,
                grad_norm=gnorm,
                radius=radius,
            )
        )
        if not (math.isfinite(fval) and math.isfinite(gnorm)):
            message = (
                f"the objective or its gradient is not finite (f = {fval}, ||grad|| = {gnorm})"
            )
            break
        if gnorm <= tol:
            message, success = f"converged: ||grad|| = {gnorm:.3e} <= tol = {tol:.1e}", True
            break
        if counts["nit"] >= maxiter:
            message = _limit_message(maxiter, history)
            break
        if time.perf_counter() > deadline:
            message = "stopped: time limit"
            break
        if H is None or age >= every:
            with torch.enable_grad():
                cols = hvp_from_gradient([g], [x], [eye.reshape(n, *x.shape)], batched=True)[0]
            counts["nhvp"] += n
            H, age = cols.reshape(n, n).detach(), 0
        stale_rejected = False
        while True:
            counts["nit"] += 1
            sub = exact_trust_region(H, gflat, radius)
            with torch.no_grad():
                x_old = x.detach().clone()
                x.add_(sub.step.reshape(x.shape))
            with torch.no_grad():
                f_new = float(fun(x))
            counts["nfev"] += 1
            rho = (fval - f_new) / sub.predicted_reduction if sub.predicted_reduction > 0 else -1.0
            if not math.isfinite(f_new):
                rho = -math.inf
            radius = update_radius(radius, rho, sub.step_norm, sub.on_boundary)
            if rho > eta:
                break
            with torch.no_grad():
                x.copy_(x_old)
            if age > 0:  # a reused Hessian gave a poor model: refresh it here
                stale_rejected = True
                break
            if radius < 1e-12 or counts["nit"] >= maxiter:
                break
        if radius < 1e-12:
            message = "stalled: trust radius below 1e-12"
            break
        f, g = evaluate()  # at the accepted point, or afresh at x after a stale rejection
        if stale_rejected:
            H = None
        else:
            age += 1
    return OptimizeResult(
        x=x.detach().clone(),
        fun=float(f.detach()),
        grad_norm=gnorm,
        nit=counts["nit"],
        nfev=counts["nfev"],
        ngev=counts["ngev"],
        nhvp=counts["nhvp"],
        success=success,
        message=message,
        method="newton-exact",
        history=history,
        time=time.perf_counter() - t0,
    )
